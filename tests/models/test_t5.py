"""Our T5 encoder against transformers' PyTorch T5EncoderModel (random small configs, padded batches) and against
the AF-CLAP golden fixture (NVIDIA's code running transformers' T5 in fp32)."""
from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from af2_jax.models.t5 import T5Config, T5Encoder, relative_position_buckets, t5_preset

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def afclap_dir(afclap_fixture_dir) -> pathlib.Path:
    return afclap_fixture_dir  # tests/conftest.py: ../shared/fixtures/afclap_tiny or $AF2_JAX_FIXTURES


def make_hf_t5(seed: int, **fields):
    """A random transformers T5EncoderModel (eager attention, eval mode) with non-trivial norm weights."""
    from transformers import T5Config as HFT5Config, T5EncoderModel

    config = HFT5Config(feed_forward_proj="gated-gelu", dropout_rate=0.1, is_encoder_decoder=False, use_cache=False,
                        tie_word_embeddings=False, attn_implementation="eager", **fields)
    torch.manual_seed(seed)
    model = T5EncoderModel(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            elif "relative_attention_bias" in name or "shared" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / np.sqrt(p.shape[-1]))
    return model


def ours_from_hf(hf_model, config: T5Config) -> T5Encoder:
    """Our encoder holding the transformers model's weights, copied attribute by attribute (torch Linear is
    (out, in), ours (in, out))."""
    model = nnx.eval_shape(lambda: T5Encoder(config, rngs=nnx.Rngs(0)))
    blocks = hf_model.encoder.block

    def stacked(get):
        return jnp.asarray(np.stack([get(b).detach().numpy() for b in blocks]))

    model.embed_tokens.value = jnp.asarray(hf_model.shared.weight.detach().numpy())
    model.relative_attention_bias.value = jnp.asarray(
        blocks[0].layer[0].SelfAttention.relative_attention_bias.weight.detach().numpy())
    lay = model.layers
    lay.attention_norm.scale.value = stacked(lambda b: b.layer[0].layer_norm.weight)
    for ours, theirs in (("query", "q"), ("key", "k"), ("value", "v"), ("out", "o")):
        getattr(lay.attention, ours).kernel.value = stacked(lambda b: getattr(b.layer[0].SelfAttention, theirs).weight.T)
    lay.ff_norm.scale.value = stacked(lambda b: b.layer[1].layer_norm.weight)
    for name in ("wi_0", "wi_1", "wo"):
        getattr(lay.ff, name).kernel.value = stacked(lambda b: getattr(b.layer[1].DenseReluDense, name).weight.T)
    model.final_norm.scale.value = jnp.asarray(hf_model.encoder.final_layer_norm.weight.detach().numpy())
    return model


HF_CONFIGS = {
    # (fields, sequence length): odd sizes, buckets/distances other than Flan-T5's, exact/log boundaries crossed
    "small": (dict(vocab_size=97, d_model=48, d_kv=8, num_heads=3, num_layers=3, d_ff=40,
                   relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6),
              77),
    "odd": (dict(vocab_size=61, d_model=40, d_kv=12, num_heads=5, num_layers=2, d_ff=72,
                 relative_attention_num_buckets=12, relative_attention_max_distance=20, layer_norm_epsilon=1e-5), 40),
}


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_matches_transformers_with_padding(name):
    fields, length = HF_CONFIGS[name]
    hf_model = make_hf_t5(seed=sorted(HF_CONFIGS).index(name), **fields)
    config = T5Config(**fields)
    model = ours_from_hf(hf_model, config)
    rng = np.random.default_rng(3)
    lengths = [length, length // 3, 5, 1]
    ids = rng.integers(3, fields["vocab_size"], (len(lengths), length))
    mask = (np.arange(length)[None] < np.array(lengths)[:, None]).astype(np.int64)
    ids = np.where(mask, ids, 0)
    with torch.no_grad():
        ref = hf_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                       output_hidden_states=True)
    graphdef, state = nnx.split(model)
    run = jax.jit(lambda st, i, m: nnx.merge(graphdef, st)(i, m, return_block_outputs=True))
    last, blocks = run(state, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))
    expected = ref.last_hidden_state.numpy()
    diff = np.abs(np.asarray(last) - expected).max()
    print(f"{name}: max|diff| {diff:.3g}, max|ref| {np.abs(expected).max():.3g}")
    np.testing.assert_allclose(np.asarray(last), expected, atol=1e-5, rtol=1e-5)  # padded positions included
    # hidden_states[i + 1] is block i's output (the last one after the final norm in transformers)
    for i in range(fields["num_layers"] - 1):
        np.testing.assert_allclose(np.asarray(blocks[i]), ref.hidden_states[i + 1].numpy(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("buckets,distance,length", [(32, 128, 300), (32, 128, 77), (12, 20, 50), (8, 16, 40)])
def test_relative_position_buckets_match_transformers(buckets, distance, length):
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    expected = T5Attention._relative_position_bucket(rel, bidirectional=True, num_buckets=buckets,
                                                     max_distance=distance).numpy()
    np.testing.assert_array_equal(relative_position_buckets(length, length, buckets, distance), expected)


def _fixture_encoder(afclap_dir) -> T5Encoder:
    """Our tiny T5 holding the fixture's text_branch weights (read by name from the safetensors file)."""
    from safetensors.numpy import load_file

    sd = load_file(afclap_dir / "state_dict.safetensors")
    p = "module.text_branch."
    config = t5_preset("tiny")
    model = nnx.eval_shape(lambda: T5Encoder(config, rngs=nnx.Rngs(0)))
    blocks = range(config.num_layers)

    def stacked(fmt, transpose=True):
        return jnp.asarray(np.stack([sd[p + fmt.format(i)].T if transpose else sd[p + fmt.format(i)]
                                     for i in blocks]))

    model.embed_tokens.value = jnp.asarray(sd[p + "shared.weight"])
    model.relative_attention_bias.value = jnp.asarray(
        sd[p + "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"])
    lay = model.layers
    lay.attention_norm.scale.value = stacked("encoder.block.{}.layer.0.layer_norm.weight", False)
    for ours, theirs in (("query", "q"), ("key", "k"), ("value", "v"), ("out", "o")):
        getattr(lay.attention, ours).kernel.value = stacked(f"encoder.block.{{}}.layer.0.SelfAttention.{theirs}.weight")
    lay.ff_norm.scale.value = stacked("encoder.block.{}.layer.1.layer_norm.weight", False)
    for name in ("wi_0", "wi_1", "wo"):
        getattr(lay.ff, name).kernel.value = stacked(f"encoder.block.{{}}.layer.1.DenseReluDense.{name}.weight")
    model.final_norm.scale.value = jnp.asarray(sd[p + "encoder.final_layer_norm.weight"])
    return model


def test_matches_fixture(afclap_dir):
    inputs = np.load(afclap_dir / "inputs.npz")
    out = np.load(afclap_dir / "outputs.npz")
    model = _fixture_encoder(afclap_dir)
    np.testing.assert_array_equal(relative_position_buckets(77, 77), out["t5_rel_buckets"])
    bias = np.asarray(model.position_bias(77))  # (heads, q, k)
    np.testing.assert_array_equal(np.moveaxis(bias, 0, -1), out["t5_rel_bias_values"])
    graphdef, state = nnx.split(model)
    run = jax.jit(lambda st, i, m: nnx.merge(graphdef, st)(i, m, return_block_outputs=True))
    last, blocks = run(state, jnp.asarray(inputs["input_ids"], jnp.int32),
                       jnp.asarray(inputs["attention_mask"], jnp.int32))
    for name, ours in (("t5_block0_out", blocks[0]), ("t5_last_hidden", last)):
        diff = np.abs(np.asarray(ours) - out[name]).max()
        print(f"{name}: max|diff| {diff:.3g}, max|ref| {np.abs(out[name]).max():.3g}")
        np.testing.assert_allclose(np.asarray(ours), out[name], atol=3e-5, rtol=1e-5, err_msg=name)


def test_dropout_only_when_not_deterministic(afclap_dir):
    model = _fixture_encoder(afclap_dir)
    ids = jnp.asarray(np.load(afclap_dir / "inputs.npz")["input_ids"][:2], jnp.int32)
    mask = (ids != 0).astype(jnp.int32)
    base = model(ids, mask)
    np.testing.assert_array_equal(np.asarray(model(ids, mask, rngs=nnx.Rngs(dropout=1))), np.asarray(base))
    a = model(ids, mask, deterministic=False, rngs=nnx.Rngs(dropout=1))
    b = model(ids, mask, deterministic=False, rngs=nnx.Rngs(dropout=1))
    c = model(ids, mask, deterministic=False, rngs=nnx.Rngs(dropout=2))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3
    assert np.abs(np.asarray(a) - np.asarray(base)).max() > 1e-3
    with pytest.raises(ValueError, match="rngs"):
        model(ids, mask, deterministic=False)


def test_presets_and_config_checks():
    large = t5_preset("flan-t5-large")
    assert (large.d_model, large.d_kv, large.num_heads, large.num_layers, large.d_ff, large.vocab_size) == \
        (1024, 64, 16, 24, 2816, 32128)
    state = nnx.state(nnx.eval_shape(lambda: T5Encoder(large, rngs=nnx.Rngs(0))), nnx.Param)
    count = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(state))
    # afclap_reference.md: text branch 341,231,104 unique tensors = ours (the tied alias is one tensor)
    assert count == 341_231_104
    assert T5Config.from_hf(dict(vocab_size=10, d_model=8, d_kv=4, num_heads=2, num_layers=1, d_ff=16,
                                 feed_forward_proj="gated-gelu")).d_ff == 16
    with pytest.raises(ValueError, match="gated-gelu"):
        T5Config.from_hf(dict(vocab_size=10, d_model=8, d_kv=4, num_heads=2, num_layers=1, d_ff=16))
    with pytest.raises(KeyError, match="unknown T5 preset"):
        t5_preset("t5-11b")
    with pytest.raises(ValueError, match="positive"):
        T5Config(vocab_size=0, d_model=8, d_kv=4, num_heads=2, num_layers=1, d_ff=16)
