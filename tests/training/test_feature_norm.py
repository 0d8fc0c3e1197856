"""HTSAT's output tokens standardised from the data (`model.calibrate_feature_norm`): its final LayerNorm's scale
and bias are set once before step 0 of a fresh run so that the tokens of the run's first batches have mean 0 and the
configured standard deviation per channel; a resumed run reads the saved values back."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from af2_jax.audio.mel import log_mel
from af2_jax.models import htsat_calibration
from af2_jax.models.htsat import HTSAT, htsat_preset
from af2_jax.training import feature_norm, loop
from helpers import RandomBatches, flat, random_batches, stage_config


def test_standardised_norm_matches_float64_standardisation():
    rng = np.random.default_rng(0)
    normalised = rng.normal(size=(500, 6))  # LN(x): what the final LayerNorm's affine part multiplies
    scale, bias = rng.uniform(0.5, 2.0, 6), rng.normal(size=6) * 3
    tokens = normalised * scale + bias
    moments = np.stack([tokens.sum(0), np.square(tokens).sum(0), np.full(6, len(tokens))])
    new = htsat_calibration.standardised_norm(scale, bias, moments, target_std=0.3)
    expected = (tokens - tokens.mean(0)) / tokens.std(0) * 0.3
    np.testing.assert_allclose(normalised * new["scale"] + new["bias"], expected, atol=1e-5)
    with pytest.raises(ValueError, match="no audio window"):
        htsat_calibration.standardised_norm(scale, bias, None)
    with pytest.raises(ValueError, match="target_std"):
        htsat_calibration.standardised_norm(scale, bias, moments, target_std=0.0)


def test_model_level_calibration_on_an_htsat():
    """Both calibrations on a bare HTSAT, against float64 NumPy statistics of the same batches."""
    htsat = HTSAT(htsat_preset("tiny", depths=(2, 2, 2, 2)), rngs=nnx.Rngs(0))
    batches = [next(RandomBatches(2, windows=2, tokens=8, seed=s)) for s in range(2)]
    mean, var = htsat_calibration.calibrate_input_norm(htsat, batches)
    mels = np.concatenate([np.asarray(log_mel(jnp.asarray(b["audio"][b["audio_mask"] > 0])), np.float64)
                           .reshape(-1, 64) for b in batches])
    np.testing.assert_allclose(np.asarray(htsat.bn0.mean[...]), mels.mean(0), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(htsat.bn0.var[...]), mels.var(0, ddof=1), rtol=1e-3)

    htsat_calibration.standardise_output_norm(htsat, batches, target_std=0.5)
    tokens = np.concatenate([np.asarray(htsat(log_mel(jnp.asarray(b["audio"][b["audio_mask"] > 0]))), np.float64)
                             .reshape(-1, htsat.config.num_features) for b in batches])
    np.testing.assert_allclose(tokens.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(tokens.std(0), 0.5, atol=1e-3)


def _calibration_tokens(cfg, run):
    """float64 HTSAT tokens of the calibration batches, through the run's model."""
    model = run.split.merge(run.state["trainable"], run.state["batch_stats"], run.frozen)
    batches = RandomBatches(cfg.batch_size, windows=cfg.max_windows, tokens=cfg.max_tokens, seed=cfg.seed)
    return np.concatenate([
        np.asarray(model.htsat(log_mel(jnp.asarray(next(batches)["audio"])), train=False), np.float64)
        .reshape(-1, model.config.htsat.num_features) for _ in range(loop.CALIBRATION_BATCHES)])


def test_fresh_run_standardises_htsat_tokens_and_a_resumed_run_keeps_them(tmp_path):
    cfg = stage_config(1, num_steps=4, **{"model.calibrate_feature_norm": 0.5})
    first = loop.train(cfg, tmp_path / "run", make_iterator=random_batches(), max_steps=2)
    tokens = _calibration_tokens(cfg, first)
    np.testing.assert_allclose(tokens.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(tokens.std(0), 0.5, atol=1e-3)
    norm = {k: v for k, v in flat(first.frozen).items() if k.startswith("htsat/norm/")}
    assert set(norm) == {"htsat/norm/scale", "htsat/norm/bias"}  # stage 1: HTSAT frozen

    cfg.seed = 1  # other data: measuring again would change the values
    resumed = loop.train(cfg, tmp_path / "run", make_iterator=random_batches(), max_steps=0)
    for path, value in norm.items():
        np.testing.assert_array_equal(flat(resumed.frozen)[path], value)

    (tmp_path / "run" / feature_norm.FILE).unlink()
    with pytest.raises(FileNotFoundError, match="calibrate_feature_norm"):
        loop.train(cfg, tmp_path / "run", make_iterator=random_batches(), max_steps=0)
