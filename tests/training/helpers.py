"""Shared test helpers: a small stage config, and a deterministic, checkpointable batch iterator (batch k is a
pure function of (seed, k), so a resumed run must see exactly the batches an uninterrupted one saw)."""
import importlib.util
import pathlib

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[2]


def stage_config(stage: int, **overrides):
    spec = importlib.util.spec_from_file_location(f"stage{stage}", REPO / "configs" / f"stage{stage}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config("tiny")
    cfg.num_steps = 4
    cfg.batch_size = 8
    cfg.max_windows = 1
    cfg.max_tokens = 12
    cfg.log_every = 1
    cfg.optimizer.warmup_steps = 1
    cfg.checkpoint.every_steps = 2
    cfg.checkpoint.async_save = False
    cfg.mesh.fsdp = 1
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


class RandomBatches:
    """Batches of random audio and token ids; `get_state`/`set_state` are the batch index."""

    def __init__(self, rows: int, *, windows: int = 1, tokens: int = 12, vocab: int = 300, seed: int = 0,
                 process_index: int = 0, process_count: int = 1, on_batch=None):
        self.rows, self.windows, self.tokens, self.vocab = rows, windows, tokens, vocab
        self.seed, self.process_index, self.process_count, self.index = seed, process_index, process_count, 0
        self.on_batch = on_batch  # called with the batch index before it is produced (tests send signals)

    def __iter__(self):
        return self

    def __next__(self):
        if self.on_batch is not None:
            self.on_batch(self.index)
        batch = self._global_batch(np.random.default_rng((self.seed, self.index)), self.rows * self.process_count)
        self.index += 1
        rows = slice(self.process_index * self.rows, (self.process_index + 1) * self.rows)
        return {k: v[rows] for k, v in batch.items()}

    def _global_batch(self, rng, rows):
        """The same global batch whatever the process count; each process yields its block of rows."""
        lengths = rng.integers(self.tokens // 2, self.tokens + 1, rows)
        attention = (np.arange(self.tokens)[None] < lengths[:, None]).astype(np.int32)
        loss_mask = attention * (np.arange(self.tokens)[None] >= 3)
        return {"audio": (0.3 * rng.normal(size=(rows, self.windows, 160000))).astype(np.float32),
                "audio_mask": np.ones((rows, self.windows), np.float32),
                "input_ids": (rng.integers(0, self.vocab, (rows, self.tokens)) * attention).astype(np.int32),
                "attention_mask": attention, "loss_mask": loss_mask.astype(np.float32)}

    def get_state(self):
        return {"index": self.index}

    def set_state(self, state):
        self.index = int(state["index"])


def random_batches(vocab: int = 300, on_batch=None):
    """A `make_iterator` for `loop.train`."""
    def make(cfg, tokenizer, rows_per_process):
        import jax
        return RandomBatches(rows_per_process, windows=cfg.max_windows, tokens=cfg.max_tokens, vocab=vocab,
                             seed=cfg.seed, process_index=jax.process_index(), process_count=jax.process_count(),
                             on_batch=on_batch)
    return make


def tiny_model_factory():
    """The model the training tests run: the stand-in until the real tiny AF2's audio encoder lands."""
    from flax import nnx
    from standin import StandInAF2, StandInConfig
    return lambda: StandInAF2(StandInConfig(), rngs=nnx.Rngs(0))
