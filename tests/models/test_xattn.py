"""Gated cross-attention block against the reference's captured arrays (af2_tiny fixture) and a float64 NumPy
re-derivation of the fully-masked case."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from af2_jax import param_tree
from af2_jax.convert import mapping
from af2_jax.convert.af2_keys import xattn_rules
from af2_jax.convert.tensor_files import PrefixView, SafetensorsSource
from af2_jax.models.xattn import GatedCrossAttentionBlock, XAttnConfig

CONFIG = XAttnConfig(dim=64, dim_audio=128)  # the fixture's shapes (heads 8, dim_head 64, ff_mult 4)


def _block_from_fixture(fixture_dir, layer: int) -> GatedCrossAttentionBlock:
    block = GatedCrossAttentionBlock(CONFIG, rngs=nnx.Rngs(0))
    prefix = f"lang_encoder.model.layers.{layer}.gated_cross_attn_layer_sound."
    flat = param_tree.flatten(nnx.state(block).to_pure_dict())
    targets = {k: (v.shape, v.dtype) for k, v in flat.items()}
    source = PrefixView(SafetensorsSource([fixture_dir / "state_dict.safetensors"]), prefix)
    loaded = mapping.import_tensors(xattn_rules(CONFIG, prefix, ""), source, targets)
    nnx.update(block, param_tree.unflatten({k: jnp.asarray(v) for k, v in loaded.items()}))
    return block


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_block_matches_reference_stage_by_stage(fixture_dir, fixture_outputs, layer):
    out = fixture_outputs
    block = _block_from_fixture(fixture_dir, layer)
    media = jnp.asarray(out["audio_transformer_out"])
    mask = jnp.asarray(out["audio_tokens_mask"])
    h = jnp.asarray(out[f"lm_layer{layer}_in"])
    k, v = block.audio_kv(media)
    attn_out = block.attend(h, k, v, mask)
    np.testing.assert_allclose(attn_out, out[f"xattn{layer}_attn_out"], atol=2e-4, rtol=1e-4)
    after_attn = h + jnp.tanh(block.attn_gate[...]) * attn_out
    np.testing.assert_allclose(block.feed_forward(after_attn), out[f"xattn{layer}_ff_out"], atol=2e-4, rtol=1e-4)
    full = block(h, (k, v), mask)
    np.testing.assert_allclose(full, out[f"xattn{layer}_out"], atol=2e-4, rtol=1e-4)
    np.testing.assert_array_equal(block.attn_gate[...], out[f"xattn{layer}_attn_gate"])
    np.testing.assert_array_equal(block.ff_gate[...], out[f"xattn{layer}_ff_gate"])
    print(f"layer {layer}: max |out - ref| = {float(jnp.max(jnp.abs(full - out[f'xattn{layer}_out']))):.2e}")


def test_fresh_block_is_identity():
    block = GatedCrossAttentionBlock(CONFIG, rngs=nnx.Rngs(3))
    h = jax.random.normal(jax.random.key(0), (2, 5, CONFIG.dim))
    media = jax.random.normal(jax.random.key(1), (2, 7, CONFIG.dim_audio))
    out = block(h, block.audio_kv(media), jnp.ones((2, 7)))
    np.testing.assert_array_equal(out, h)


def test_no_valid_audio_attends_uniformly_like_the_reference(fixture_dir, fixture_outputs):
    """-FLT_MAX masking then max-subtraction: a sample with no valid audio averages all audio values."""
    block = _block_from_fixture(fixture_dir, 0)
    media = np.asarray(fixture_outputs["audio_transformer_out"], np.float64)
    h = np.asarray(fixture_outputs["lm_layer0_in"], np.float64)
    mask = np.zeros(media.shape[:2], np.float32)
    mask[1, :5] = 1.0  # sample 0: no valid audio; sample 1: only 5 tokens
    got = block.attend(jnp.asarray(h, jnp.float32), *block.audio_kv(jnp.asarray(media, jnp.float32)), jnp.asarray(mask))

    # float64 NumPy re-derivation from the torch-layout weights
    src = SafetensorsSource([fixture_dir / "state_dict.safetensors"])
    p = "lang_encoder.model.layers.0.gated_cross_attn_layer_sound.attn."
    w = {name: src.get(p + name).astype(np.float64) for name in
         ("norm.weight", "norm.bias", "to_q.weight", "to_kv.weight", "to_out.weight")}
    x = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-5) * w["norm.weight"] + w["norm.bias"]
    q = (x @ w["to_q.weight"].T).reshape(2, -1, 8, 64).transpose(0, 2, 1, 3) * 64 ** -0.5
    kv = media @ w["to_kv.weight"].T
    k, v = (a.reshape(2, -1, 8, 64).transpose(0, 2, 1, 3) for a in np.split(kv, 2, axis=-1))
    sim = np.einsum("bhtd,bhsd->bhts", q, k)
    sim = np.where(mask[:, None, None, :] > 0, sim, -np.inf)
    sim[0] = 0.0  # all keys masked: the reference ends with a uniform distribution
    attn = np.exp(sim - sim.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    ref = np.einsum("bhts,bhsd->bthd", attn, v).reshape(2, -1, 512) @ w["to_out.weight"].T
    np.testing.assert_allclose(got, ref, atol=2e-4, rtol=1e-4)
