#!/usr/bin/env bash
# Train one AF2 stage on a Cloud TPU pod slice: the same command on every host (jax.distributed.initialize()
# discovers the slice from the TPU metadata; each host feeds its own share of the batch).
#
#   TPU_NAME=af2-v5p-64 ZONE=us-east5-a STAGE=1 PRESET=3b WORKDIR=gs://bucket/af2/s1 \
#   EXTRA="--config.init_from=llm=gs://bucket/qwen2.5-3b,htsat=gs://bucket/af-clap --config.tokenizer=/ckpt/qwen" \
#   bash launch/tpu_pod.sh
#
# Re-running the same command resumes from the newest checkpoint in WORKDIR. Preemption (SIGTERM) saves a
# checkpoint first. The mesh defaults to pure FSDP over all chips (--config.mesh.fsdp=-1); the global batch is
# --config.batch_size rows per micro-batch (scale it with the chip count).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${WORKDIR:?set WORKDIR}"
STAGE="${STAGE:-1}"
PRESET="${PRESET:-3b}"
REPO_DIR="${REPO_DIR:-~/af2-jax}"
EXTRA="${EXTRA:-}"

gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone "${ZONE}" --worker=all --command "
  cd ${REPO_DIR} && \
  .venv/bin/python launch/train.py --config configs/stage${STAGE}.py:${PRESET} --workdir ${WORKDIR} ${EXTRA} \
    2>&1 | tee -a /tmp/af2_train_stage${STAGE}.log"
