"""HTSAT's input normalisation from the data (`model.calibrate_input_norm`): bn0's running statistics are the
log-mel mean and variance of the run's first batches (real windows only), set once before step 0 of a fresh run and
kept by a resumed one."""
import jax.numpy as jnp
import numpy as np

from af2_jax.audio.mel import log_mel
from af2_jax.models import htsat_calibration
from af2_jax.training import loop
from helpers import RandomBatches, flat, random_batches, stage_config


def _numpy_statistics(batches):
    """float64 reference: every frame of every real window, mean and unbiased variance per mel bin."""
    frames = np.concatenate([np.asarray(log_mel(jnp.asarray(b["audio"][b["audio_mask"] > 0])), np.float64)
                             .reshape(-1, 64) for b in batches])
    return frames.mean(0), frames.var(0, ddof=1)


def test_statistics_cover_real_windows_only():
    rng = np.random.default_rng(0)
    batches = []
    for k in range(2):
        audio = (rng.normal(size=(2, 3, 160000)) * (0.1 + k)).astype(np.float32)
        mask = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
        audio[mask == 0] = 5.0  # padding that must not count
        batches.append({"audio": audio, "audio_mask": mask})
    mean, var = htsat_calibration.input_statistics(htsat_calibration.log_mel_moments(batches))
    ref_mean, ref_var = _numpy_statistics(batches)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-5)
    np.testing.assert_allclose(var, ref_var, rtol=1e-3)


def test_fresh_run_calibrates_bn0_and_a_resumed_run_keeps_it(tmp_path):
    cfg = stage_config(1, num_steps=4, **{"model.calibrate_input_norm": True})
    first = loop.train(cfg, tmp_path / "run", make_iterator=random_batches(), max_steps=2)
    stats = flat(first.state["batch_stats"])
    calibration = RandomBatches(cfg.batch_size, windows=cfg.max_windows, tokens=cfg.max_tokens, seed=cfg.seed)
    mean, var = _numpy_statistics([next(calibration) for _ in range(loop.CALIBRATION_BATCHES)])
    np.testing.assert_allclose(stats["htsat/bn0/mean"], mean, rtol=1e-5)
    np.testing.assert_allclose(stats["htsat/bn0/var"], var, rtol=1e-3)

    cfg.seed = 1  # other data: recalibrating would change the statistics
    resumed = loop.train(cfg, tmp_path / "run", make_iterator=random_batches(), max_steps=0)
    np.testing.assert_array_equal(flat(resumed.state["batch_stats"])["htsat/bn0/mean"], stats["htsat/bn0/mean"])
