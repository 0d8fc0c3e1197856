"""The run config reaches each component's remat policy (decoder superblocks, HTSAT, audio transformer), a policy
changes what the backward pass keeps, not the gradients, and the Qwen2 scan's own switches, never read inside AF2,
are refused there."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from af2_jax.models.af2 import af2_preset
from af2_jax.models.audio_transformer import AudioTransformer, audio_transformer_preset
from helpers import model_config, stage_config


def test_each_component_remat_policy_comes_from_the_run_config():
    cfg = stage_config(2, **{"model.remat_policy": "full", "model.htsat_remat_policy": "dots",
                             "model.audio_transformer_remat_policy": "full"})
    config = model_config(cfg)
    assert (config.remat_policy, config.htsat.remat_policy, config.audio_transformer.remat_policy) == \
        ("full", "dots", "full")
    default = model_config(stage_config(2))
    assert (default.remat_policy, default.htsat.remat_policy, default.audio_transformer.remat_policy) == \
        ("none", "none", "none")


def test_audio_transformer_remat_gives_the_same_gradients():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 64, 128)), jnp.float32)  # the tiny d_model
    mask = jnp.asarray([[1] * 64, [1] * 40 + [0] * 24], bool)  # the second row padded

    def grads(policy):
        model = AudioTransformer(audio_transformer_preset("tiny", remat_policy=policy),
                                 rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(model)
        loss = lambda p: jnp.sum(jnp.square(nnx.merge(graphdef, p)(x, mask)))  # noqa: E731
        return jax.tree.leaves(jax.jit(jax.grad(loss))(params))

    for a, b in zip(grads("none"), grads("full")):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_qwen2_scan_switches_are_refused_inside_af2():
    config = af2_preset("tiny")
    for field, value in (("remat_policy", "full"), ("scan_unroll", True)):
        with pytest.raises(ValueError, match="AF2Config.remat_policy / scan_unroll"):
            dataclasses.replace(config, llm=dataclasses.replace(config.llm, **{field: value}))
