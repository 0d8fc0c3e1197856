"""Shared test helpers: a small stage config of the REAL tiny AF2 (its HTSAT cut to 2 blocks per stage: the tests
check training mechanics, not HTSAT numerics), the model it builds, and a deterministic, checkpointable batch
iterator (batch k is a pure function of (seed, k), so a resumed run must see exactly the batches an uninterrupted
one saw)."""
import functools
import pathlib

import numpy as np
from tests.scripts import load_script

REPO = pathlib.Path(__file__).resolve().parents[2]
HTSAT_DEPTHS = (2, 2, 2, 2)  # the tiny preset's widths and heads; depths (2, 2, 12, 2) -> 4 Swin block pairs
TOKENS = 16
ROWS = 8  # one row per device of the 8 simulated CPU devices


def stage_config(stage: int, **overrides):
    cfg = load_script(f"configs/stage{stage}.py").get_config("tiny")
    cfg.num_steps = 4
    cfg.batch_size = ROWS
    cfg.max_windows = 1
    cfg.max_tokens = TOKENS
    cfg.model.htsat_depths = HTSAT_DEPTHS
    cfg.model.calibrate_feature_norm = 0.0  # measured on the run's first batches: test_feature_norm turns it on
    cfg.log_every = 1
    cfg.optimizer.warmup_steps = 0  # full learning rate from step 1: 2 steps move every trainable parameter
    cfg.checkpoint.every_steps = 2
    cfg.checkpoint.async_save = False
    cfg.mesh.fsdp = 1
    cfg.export_final = False
    return apply_overrides(cfg, overrides)


def apply_overrides(cfg, overrides: dict):
    """Sets each dotted key ('optimizer.learning_rate') of `overrides` in the config; returns it."""
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


@functools.cache
def tokenizer():
    from af2_jax.data.synthetic import synthetic_tokenizer
    return synthetic_tokenizer()


def vocab_size() -> int:
    """The real tiny vocabulary: the synthetic tokenizer's (the tiny model is resized to it)."""
    return len(tokenizer())


def model_config(cfg=None):
    """The AF2Config `loop.train` builds for `cfg` (default: stage 1's test config)."""
    from af2_jax.training import initialization
    cfg = cfg if cfg is not None else stage_config(1)
    return initialization.model_config(cfg.model, max_windows=cfg.max_windows, tokenizer=tokenizer())


class RandomBatches:
    """Batches of random audio and token ids; `get_state`/`set_state` are the batch index."""

    def __init__(self, rows: int, *, windows: int = 1, tokens: int = TOKENS, vocab: int | None = None, seed: int = 0,
                 process_index: int = 0, process_count: int = 1, on_batch=None, nan_at: int | None = None):
        self.rows, self.windows, self.tokens = rows, windows, tokens
        self.vocab = vocab if vocab is not None else vocab_size()
        self.seed, self.process_index, self.process_count, self.index = seed, process_index, process_count, 0
        self.on_batch = on_batch  # called with the batch index before it is produced (tests send signals)
        self.nan_at = nan_at  # this batch's audio is NaN (a non-finite loss)

    def __iter__(self):
        return self

    def __next__(self):
        if self.on_batch is not None:
            self.on_batch(self.index)
        batch = self._global_batch(np.random.default_rng((self.seed, self.index)), self.rows * self.process_count)
        if self.index == self.nan_at:
            batch["audio"][:] = np.nan
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


def random_batches(vocab: int | None = None, on_batch=None, nan_at=None):
    """A `make_iterator` for `loop.train` (default vocabulary: the tokenizer's, which the model is sized to)."""
    def make(cfg, tok, rows_per_process):
        import jax
        return RandomBatches(rows_per_process, windows=cfg.max_windows, tokens=cfg.max_tokens,
                             vocab=vocab if vocab is not None else len(tok), seed=cfg.seed,
                             process_index=jax.process_index(), process_count=jax.process_count(),
                             on_batch=on_batch, nan_at=nan_at)
    return make


def tiny_model_factory(cfg=None):
    """The real AF2Model of the test config (af2_preset('tiny'), shallower HTSAT, the tokenizer's vocabulary), as
    `loop.train` builds it; for tests that drive the train step directly."""
    from af2_jax.training import initialization
    cfg = cfg if cfg is not None else stage_config(1)
    return initialization.model_factory(model_config(cfg), cfg.seed)


def flat(tree):
    """'/'-pathed host arrays of an nnx.State / pytree."""
    import jax
    from af2_jax.param_tree import path_string, to_pure
    return {path_string(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(to_pure(tree))[0]}


@functools.cache
def run_steps(stage: int, mesh_shape: tuple[int, int, int], steps: int = 2, accumulation: int = 2,
              rows: int = ROWS):
    """`steps` jitted train steps of the test model (the stage's trainable set, HTSAT in training mode in stage 2)
    on a ('data', 'fsdp', 'tensor') mesh, each over `rows` x `accumulation` rows; memoised, so the test files share
    one compiled run per (stage, mesh). -> dict(losses, params_before, params_after, stats_before, stats_after)."""
    import math

    import jax
    from flax import nnx

    from af2_jax import sharding
    from af2_jax.training import optimizer, step as step_lib, train_state
    from af2_jax.training.distributed import global_batch

    cfg = stage_config(stage, batch_size=rows)
    mesh = sharding.make_mesh(*mesh_shape, devices=jax.devices()[:math.prod(mesh_shape)])
    tx = optimizer.make_optimizer(cfg.optimizer, cfg.trainable)
    split, state, frozen, shardings = train_state.create_train_state(tiny_model_factory(cfg), cfg.trainable, tx,
                                                                     mesh)
    initial = split.merge(state["trainable"], state["batch_stats"], frozen)
    before, stats_before = flat(nnx.state(initial, nnx.Param)), flat(nnx.state(initial, nnx.BatchStat))
    step = step_lib.jit_train_step(step_lib.make_train_step(
        split, tx, optimizer.learning_rate_schedule(cfg.optimizer), loss=step_lib.af2_loss(train_htsat=stage >= 2)),
        mesh, shardings)
    batches = RandomBatches(rows * accumulation)
    losses = []
    with jax.set_mesh(mesh):
        for _ in range(steps):
            state, metrics = step(state, frozen, global_batch(next(batches), mesh, accumulation))
            losses.append(float(metrics["loss"]))
    model = split.merge(state["trainable"], state["batch_stats"], frozen)
    return dict(losses=losses, params_before=before, params_after=flat(nnx.state(model, nnx.Param)),
                stats_before=stats_before, stats_after=flat(nnx.state(model, nnx.BatchStat)))
