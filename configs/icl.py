"""The in-context-learning demo's training run (launch/icl_demo.py, docs/ICL.md): the tiny AF2 with AF1's
media-location mask, trained on interleaved few-shot episodes of the made-up-names skill and on two-round chats of
the one-more-than-that skill (af2_jax/data/synthetic_icl.py), read as JSONL manifests through the usual pipeline.

`get_config('DATA_DIR')`: DATA_DIR holds the demo's manifests (icl-train.jsonl, chat-train.jsonl), tokenizer/ and
init/ (the random tiny AF2 with HTSAT's output norm calibrated on the clips, as the tiny curriculum does at its
step 0). launch/icl_demo.py writes them first; with launch/train.py the model would lack the media-location mask
(initialization.model_config has no field for it), so the demo runs the loop itself.
"""
import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location("af2_configs_base", pathlib.Path(__file__).with_name("base.py"))
base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(base)

# HTSAT stays frozen (a random, calibrated encoder, as tiny stage 1): its forward over 5 clips x 8 rows is most of a
# step, its backward would be more. The LLM trains: copying a name from the examples is a text skill, which the
# tiny curriculum's frozen random LLM could not learn.
TRAINABLE = ("audio_transformer/.*", "xattn/.*", "llm/.*")
ICL_WEIGHT, CHAT_WEIGHT = 0.7, 0.3


def get_config(data_dir: str = "runs/icl/data"):
    data = pathlib.Path(data_dir)
    c = base.stage_config(1, "tiny")
    c.stage = 1
    c.trainable = TRAINABLE
    c.tokenizer = str(data / "tokenizer")
    c.init_from = str(data / "init")
    c.model.calibrate_feature_norm = 0.0  # init/ already holds the calibrated norm
    c.max_windows = 1  # every clip is under 10 s
    c.window_buckets = (1,)
    c.max_tokens = 64  # 4 examples + the query: 59 tokens; a two-round chat: 55
    c.data = {"sources": ({"kind": "jsonl", "path": str(data / "icl-train.jsonl"), "weight": ICL_WEIGHT},
                          {"kind": "jsonl", "path": str(data / "chat-train.jsonl"), "weight": CHAT_WEIGHT})}
    c.batch_size = 8
    c.num_steps = 600
    c.optimizer.learning_rate = 3e-4
    c.optimizer.warmup_steps = 50
    c.optimizer.schedule = "cosine"
    c.optimizer.learning_rate_multipliers = (("llm/.*", 3.0),)
    c.checkpoint.every_steps = 500
    c.checkpoint.keep = 1
    c.log_every = 25
    return c
