"""Qwen2 building blocks: shapes, fp32 numerics against numpy float64, configs and presets against transformers
and the golden fixture, bf16 compute, remat/unroll and sharded execution."""
from __future__ import annotations

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import af2_jax  # noqa: F401
from af2_jax import sharding
from af2_jax.param_tree import flatten
from af2_jax.models import rope
from af2_jax.models.qwen2 import (QWEN2_PRESETS, KVCache, Qwen2Attention, Qwen2Config, Qwen2DecoderLayer,
                                  Qwen2ForCausalLM, Qwen2MLP, RMSNorm, attention_inputs, causal_attention_mask,
                                  init_cache, positions_from_attention_mask, qwen2_preset)
from tests.models.qwen2_reference import hf_position_ids

CONFIG = qwen2_preset("tiny")  # hidden 64, 3 layers, 4 heads / 2 kv heads (head_dim 16), mlp 128, vocab 300
B, T = 2, 7


@pytest.fixture(scope="module")
def model():
    return Qwen2ForCausalLM(CONFIG, rngs=nnx.Rngs(0))


def test_module_shapes(model):
    h = jax.random.normal(jax.random.key(0), (B, T, CONFIG.hidden_size))
    mask = jnp.ones((B, T), bool)
    positions, attn_mask, _ = attention_inputs(mask)
    chex.assert_shape(attn_mask, (B, T, T))
    chex.assert_shape(RMSNorm(64, eps=1e-6)(h), (B, T, 64))
    chex.assert_shape(Qwen2MLP(CONFIG, rngs=nnx.Rngs(0))(h), (B, T, 64))
    attention = Qwen2Attention(CONFIG, rngs=nnx.Rngs(0))
    out, cache = attention(h, positions=positions, mask=attn_mask)
    chex.assert_shape(out, (B, T, 64))
    assert cache is None
    layer_cache = KVCache(k=jnp.zeros((B, 10, 2, 16)), v=jnp.zeros((B, 10, 2, 16)), valid=jnp.zeros((B, 10), bool),
                          index=jnp.array(0, jnp.int32))
    positions, attn_mask, valid = attention_inputs(mask, layer_cache)
    chex.assert_shape(attn_mask, (B, T, 10))
    out, layer_cache2 = Qwen2DecoderLayer(CONFIG, rngs=nnx.Rngs(0))(
        h, positions=positions, mask=attn_mask, cache=KVCache(layer_cache.k, layer_cache.v, valid, layer_cache.index))
    chex.assert_shape(out, (B, T, 64))
    chex.assert_shape([layer_cache2.k, layer_cache2.v], (B, 10, 2, 16))

    cache = init_cache(CONFIG, B, 12)
    chex.assert_shape([cache.k, cache.v], (3, B, 12, 2, 16))
    chex.assert_shape(cache.valid, (B, 12))
    ids = jnp.arange(B * T).reshape(B, T) % CONFIG.vocab_size
    logits, cache = model(ids, cache=cache)
    chex.assert_shape(logits, (B, T, CONFIG.vocab_size))
    assert logits.dtype == jnp.float32 and int(cache.index) == T and bool(cache.valid[:, :T].all())
    chex.assert_shape(model.embed(ids), (B, T, 64))
    chex.assert_shape(model.logits(model.embed(ids)), (B, T, 300))

    params = flatten(nnx.state(model).to_pure_dict())
    assert params["embed_tokens/embedding"].shape == (300, 64)
    assert params["layers/self_attn/q_proj/kernel"].shape == (3, 64, 64)
    assert params["layers/self_attn/k_proj/bias"].shape == (3, 32)
    assert params["layers/mlp/down_proj/kernel"].shape == (3, 128, 64)
    assert "lm_head/kernel" not in params  # tied


def test_every_parameter_has_logical_axes(model):
    for path, var in nnx.to_flat_state(nnx.state(model)):
        axes = var.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == np.ndim(var.get_value()), path
        assert all(a is None or a in sharding.LOGICAL_AXIS_RULES for a in axes), path
    assert nnx.state(model).embed_tokens.embedding.get_metadata()["out_sharding"] == ("vocab", "embed")


def test_rmsnorm_matches_numpy_float64():
    x = np.random.default_rng(0).normal(size=(3, 5, 16)) * 3
    norm = RMSNorm(16, eps=1e-6)
    scale = np.random.default_rng(1).normal(size=16)
    norm.scale[...] = jnp.asarray(scale, jnp.float32)
    ref = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6) * scale
    np.testing.assert_allclose(np.asarray(norm(jnp.asarray(x, jnp.float32))), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head_dim,rotary_dim,base", [(16, None, 1e6), (8, 4, 4096.0)])
def test_apply_rotary_matches_numpy_float64(head_dim, rotary_dim, base):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 9, 3, head_dim))
    positions = rng.integers(0, 500, size=(2, 9))
    rd = head_dim if rotary_dim is None else rotary_dim
    freqs = base ** (-np.arange(0, rd, 2) / rd)
    angles = positions[..., None, None] * freqs  # (B, T, 1, rd/2), pairs (i, i + rd/2) rotate together
    x1, x2, rest = x[..., :rd // 2], x[..., rd // 2:rd], x[..., rd:]
    ref = np.concatenate([x1 * np.cos(angles) - x2 * np.sin(angles), x2 * np.cos(angles) + x1 * np.sin(angles),
                          rest], axis=-1)
    np.testing.assert_allclose(rope.inv_freq(rd, base), freqs, rtol=1e-6)
    got = rope.apply_rotary(jnp.asarray(x, jnp.float32), jnp.asarray(positions), base=base, rotary_dim=rotary_dim)
    np.testing.assert_allclose(np.asarray(got), ref, atol=2e-4)  # fp32 angles of positions up to 500


def test_positions_and_mask_of_left_padded_batch():
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    np.testing.assert_array_equal(np.asarray(positions_from_attention_mask(jnp.asarray(mask))), hf_position_ids(mask))
    got = np.asarray(causal_attention_mask(jnp.asarray(mask), 5))
    ref = np.array([[[mask[b, s] == 1 and s <= t for s in range(5)] for t in range(5)] for b in range(3)])
    np.testing.assert_array_equal(got, ref)
    # with a cache: the chunk lands at slots [index, index + T) and positions continue over real tokens
    cache = init_cache(CONFIG, 3, 8)
    cache = KVCache(cache.k, cache.v, jnp.asarray(np.pad(mask, ((0, 0), (0, 3))).astype(bool)), jnp.array(5))
    positions, attn_mask, valid = attention_inputs(jnp.ones((3, 1), jnp.int32), cache)
    np.testing.assert_array_equal(np.asarray(positions)[:, 0], mask.sum(-1))
    np.testing.assert_array_equal(np.asarray(attn_mask)[:, 0], np.asarray(valid) & (np.arange(8) <= 5))


def test_config_converts_to_and_from_transformers():
    import transformers

    config = Qwen2Config(vocab_size=123, hidden_size=48, intermediate_size=80, num_layers=2, num_heads=6,
                         num_kv_heads=2, head_dim=10, rope_theta=5e5, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         max_position_embeddings=99, param_dtype=jnp.bfloat16)
    hf = transformers.Qwen2Config(**config.to_hf())
    assert (hf.vocab_size, hf.hidden_size, hf.intermediate_size, hf.num_hidden_layers, hf.num_attention_heads,
            hf.num_key_value_heads, hf.head_dim, hf.rms_norm_eps, hf.tie_word_embeddings,
            hf.max_position_embeddings) == (123, 48, 80, 2, 6, 2, 10, 1e-5, False, 99)
    assert hf.rope_parameters["rope_theta"] == 5e5
    assert Qwen2Config.from_hf(json.loads(hf.to_json_string())) == config
    # transformers 4.x layout: rope_theta at the top level, torch_dtype
    legacy = {**config.to_hf(), "torch_dtype": "float32", "rope_scaling": None}
    del legacy["rope_parameters"], legacy["dtype"]
    assert Qwen2Config.from_hf(legacy).param_dtype is jnp.float32
    with pytest.raises(ValueError, match="rope"):
        Qwen2Config.from_hf({**config.to_hf(), "rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0}})
    with pytest.raises(ValueError, match="attention_implementation"):
        qwen2_preset("tiny", attention_implementation="flash")


def _hf_name_to_ours(name: str, shape: tuple[int, ...], layers: int) -> tuple[str, tuple[int, ...]]:
    """transformers parameter name/shape -> our path/shape (stacked layers, (in, out) kernels)."""
    if name == "model.embed_tokens.weight":
        return "embed_tokens/embedding", shape
    if name == "lm_head.weight":
        return "lm_head/kernel", shape[::-1]
    if name == "model.norm.weight":
        return "norm/scale", shape
    _, _, _, *rest = name.split(".")  # model.layers.{i}.<module...>.<weight|bias>
    *module, leaf = rest
    leaf = "scale" if module[-1].endswith("layernorm") else ("kernel" if leaf == "weight" else "bias")
    return "layers/" + "/".join(module) + "/" + leaf, (layers, *(shape[::-1] if leaf == "kernel" else shape))


@pytest.mark.parametrize("name", ["qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-3b", "qwen2.5-7b"])
def test_presets_have_transformers_parameter_shapes(name):
    import torch
    import transformers

    config = qwen2_preset(name, vocab_size=151669) if name != "qwen2.5-7b" else qwen2_preset(name)
    with torch.device("meta"):
        hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**config.to_hf()))
    expected = dict(_hf_name_to_ours(n, tuple(p.shape), config.num_layers) for n, p in hf.named_parameters()
                    if not (config.tie_word_embeddings and n == "lm_head.weight"))
    ours = flatten(nnx.state(nnx.eval_shape(lambda: Qwen2ForCausalLM(config, rngs=nnx.Rngs(0)))).to_pure_dict())
    assert {k: tuple(v.shape) for k, v in ours.items()} == expected


def test_tiny_preset_is_the_fixture_lm(fixture_dir):
    fixture = json.loads((fixture_dir / "config.json").read_text())
    hf = {**fixture["qwen2_config_args"], **fixture["qwen2_after_factory"], "model_type": "qwen2"}
    assert Qwen2Config.from_hf(hf) == qwen2_preset("tiny")
    assert set(QWEN2_PRESETS) >= {"qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-3b", "qwen2.5-7b", "tiny"}


def test_bf16_compute_stays_close_to_fp32(model):
    bf16 = nnx.merge(nnx.graphdef(Qwen2ForCausalLM(qwen2_preset("tiny", dtype=jnp.bfloat16), rngs=nnx.Rngs(0))),
                     nnx.state(model))
    ids = jnp.array([[5, 17, 42, 99, 7, 250]])
    ref, _ = model(ids)
    got, _ = bf16(ids)
    assert got.dtype == jnp.float32
    assert float(jnp.abs(got - ref).max()) <= 3e-2 * float(jnp.abs(ref).max())


def test_remat_and_unroll_keep_outputs_and_gradients(model):
    ids = jnp.array([[5, 17, 42, 99, 7, 250], [1, 2, 3, 4, 5, 6]])
    mask = jnp.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    graphdef, state = nnx.split(model)

    def loss_of(config):
        gd = nnx.graphdef(nnx.eval_shape(lambda: Qwen2ForCausalLM(config, rngs=nnx.Rngs(0))))
        return jax.jit(jax.value_and_grad(lambda s: jnp.mean(nnx.merge(gd, s)(ids, mask)[0] ** 2)))(state)

    ref_loss, ref_grad = loss_of(CONFIG)
    # one compile for all three; 'xla' is what XLA picks by default on CPU (cuDNN needs a GPU)
    loss, grad = loss_of(qwen2_preset("tiny", remat_policy="full", scan_unroll=True, attention_implementation="xla"))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    chex.assert_trees_all_close(grad, ref_grad, rtol=1e-4, atol=1e-7)


def test_sharded_forward_matches_single_device(model):
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    ids = jnp.array([[5, 17, 42, 99, 7, 250]] * 4)
    graphdef, state = nnx.split(model)
    ref, _ = model(ids)
    with jax.set_mesh(mesh):
        state = jax.device_put(state, sharding.state_shardings(state, mesh))
        got = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)[0])(state, ids)
    assert state["layers"]["mlp"]["gate_proj"]["kernel"].sharding.spec == jax.sharding.PartitionSpec(
        None, "fsdp", "tensor")
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)
