"""One process of the two-process test: 4 CPU devices, jax.distributed on localhost, a short run of the loop
(8 devices in all, fsdp=4 x data=2); prints its losses as JSON on the last line."""
import json
import os
import pathlib
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"
os.environ["JAX_PLATFORMS"] = "cpu"
HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE)]


def main(coordinator: str, process_id: int, workdir: str, max_steps: int):
    import jax
    from af2_jax.training import distributed, loop
    from helpers import random_batches, stage_config

    distributed.initialize(coordinator, num_processes=2, process_id=process_id)
    assert jax.process_count() == 2 and jax.device_count() == 8
    cfg = stage_config(1, num_steps=3, export_final=False, **{"mesh.data": 2, "mesh.fsdp": 4})
    result = loop.train(cfg, workdir, make_iterator=random_batches(), max_steps=max_steps)
    print(json.dumps({"status": result.status, "steps": [r["step"] for r in result.records] if process_id == 0
                      else None, "losses": [r["loss"] for r in result.records]}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
