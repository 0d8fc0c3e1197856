"""Serving weights (af2_jax/inference/serving.py) on 8 simulated devices: a model whose weights are split over an
fsdp/tensor mesh generates exactly the tokens of the same model on one device; int8 weight-only quantisation
against a float64 NumPy reading of the same rule; bf16 loading against the fp32 weights rounded by ml_dtypes."""
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from af2_jax import pretrained
from af2_jax.convert.af2_release import import_release
from af2_jax.inference import serving
from af2_jax.inference.generate import encode_audio_kv, generate_tokens, left_pad
from af2_jax.inference.sampling import SamplingConfig
from af2_jax.models.af2 import AF2Model
from af2_jax.param_tree import model_params, unflatten

GREEDY = SamplingConfig(max_new_tokens=8)
SAMPLED = SamplingConfig(temperature=1.0, max_new_tokens=8, seed=3)


@pytest.fixture(scope="module")
def model_dir(fixture_dir, tmp_path_factory):
    """The reference's tiny random AF2 with its gates scaled down (answers that depend on the prompt), saved."""
    config, params, _ = import_release(fixture_dir / "state_dict.safetensors", progress=False)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: AF2Model(config, rngs=nnx.Rngs(0))))
    state.replace_by_pure_dict(unflatten({k: jnp.asarray(v) for k, v in params.items()}))
    model = nnx.merge(graphdef, state)
    model.xattn.attn_gate[...] = model.xattn.attn_gate[...] * 0.1
    model.xattn.ff_gate[...] = model.xattn.ff_gate[...] * 0.1
    return pretrained.save(tmp_path_factory.mktemp("serving") / "model", config, model)


@pytest.fixture(scope="module")
def batch(model_dir):
    """Four rows mixing audio lengths (1 or 2 windows) and prompt lengths."""
    _, config = pretrained.read_config(model_dir)
    rng = np.random.default_rng(5)
    audio = rng.uniform(-0.5, 0.5, size=(4, 2, 160000)).astype(np.float32)
    audio_mask = np.array([[1, 0], [1, 1], [1, 0], [1, 1]], np.float32)
    audio *= audio_mask[..., None]
    prompts = [[config.audio_token_id, *rng.integers(0, 290, size=n), config.sep_token_id] for n in (3, 9, 5, 12)]
    ids, mask = left_pad(prompts, config.pad_token_id)
    return audio, audio_mask, ids, mask


def _generate(model, batch, sampling=GREEDY):
    return generate_tokens(model, *batch, sampling, eos_id=-1, data_parallel=False)


@pytest.fixture(scope="module")
def one_device(model_dir, batch):
    """(greedy, sampled) tokens of the fp32 model on the default device."""
    model = pretrained.load_model(model_dir)
    assert serving.model_mesh(model) is None
    return _generate(model, batch), _generate(model, batch, SAMPLED)


def _is_split(array) -> bool:
    return array.addressable_shards[0].data.shape != array.shape


@pytest.mark.parametrize("fsdp, tensor", [(2, 2), (8, 1)])
def test_sharded_generation_equals_one_device(model_dir, batch, one_device, fsdp, tensor):
    """data=2 x fsdp=2 x tensor=2 (the 4 rows split 4 ways) and fsdp=8 (4 rows do not split 8 ways: replicated)."""
    model = serving.load_serving_model(model_dir, serving.ServingOptions(fsdp=fsdp, tensor=tensor))
    mesh = serving.model_mesh(model)
    assert dict(mesh.shape) == {"data": 8 // (fsdp * tensor), "fsdp": fsdp, "tensor": tensor}
    # the weights really are split, not copied: the LLM's MLP and the cross-attention's keys/values
    assert _is_split(model.llm.layers.mlp.gate_proj.kernel[...])
    assert _is_split(model.xattn.to_kv[...])
    greedy = _generate(model, batch)
    np.testing.assert_array_equal(greedy, one_device[0])
    assert len(set(greedy.reshape(-1).tolist())) > 4  # the answers are not one repeated token
    if fsdp == 2:
        np.testing.assert_array_equal(_generate(model, batch, SAMPLED), one_device[1])


def test_int8_quantization_against_numpy():
    """Per output channel (the input axis summed over): scale = max|w| / 127 and |w - q scale| <= scale / 2."""
    w = np.random.default_rng(0).normal(size=(3, 16, 8)).astype(np.float32)
    w[1, :, 2] = 0.0  # an all-zero channel
    quantized = serving.quantize_int8(jnp.asarray(w), -2)
    q, scale = np.asarray(quantized.q), np.asarray(quantized.scale, np.float64)
    assert q.dtype == np.int8 and q.shape == w.shape and scale.shape == (3, 1, 8)
    expected = np.abs(w.astype(np.float64)).max(axis=-2, keepdims=True) / 127
    np.testing.assert_allclose(scale, np.where(expected > 0, expected, 1.0), rtol=1e-6)
    error = np.abs(w.astype(np.float64) - q * scale)
    assert np.all(error <= scale / 2 * (1 + 1e-5))
    assert np.abs(q).max() == 127 and np.all(q[1, :, 2] == 0)
    np.testing.assert_allclose(np.asarray(quantized[...]), (q * scale).astype(np.float32), rtol=1e-6)


def test_int8_model_reads_its_dequantised_weights(model_dir, batch):
    """The int8 model's logits are those of an fp32 model holding q * scale (computed here in NumPy); only the
    decoder's matrices are quantised; sharded int8 generation equals one-device int8 generation."""
    int8 = serving.load_serving_model(model_dir, serving.ServingOptions(quantize="int8"))
    state = nnx.state(int8, nnx.Param)
    quantized = {p for p, v in model_params(state).items() if isinstance(v, serving.Int8Weight)}
    assert {"llm/embed_tokens/embedding", "llm/layers/mlp/down_proj/kernel", "xattn/to_kv",
            "xattn/ff_in/kernel"} <= quantized
    assert not any(p.startswith(("htsat/", "audio_transformer/")) or "norm" in p for p in quantized)

    plain = pretrained.load_model(model_dir)
    dequantised = {}
    for path, value in model_params(state).items():
        if isinstance(value, serving.Int8Weight):
            dequantised[path] = jnp.asarray(np.asarray(value.q, np.float32) * np.asarray(value.scale))
    nnx.update(plain, nnx.State(unflatten(dequantised)))

    audio, audio_mask, ids, mask = batch
    logits = [np.asarray(m(jnp.asarray(audio), jnp.asarray(audio_mask), jnp.asarray(ids), jnp.asarray(mask)))
              for m in (int8, plain)]
    np.testing.assert_allclose(logits[0], logits[1], rtol=1e-5, atol=1e-5)

    sharded = serving.load_serving_model(model_dir, serving.ServingOptions(quantize="int8", fsdp=2, tensor=2))
    assert _is_split(sharded.llm.layers.mlp.gate_proj.kernel.get_value().q)
    np.testing.assert_array_equal(_generate(sharded, batch), _generate(int8, batch))


def test_bf16_serving_weights_and_audio_keys(model_dir, batch):
    """Every floating weight is the fp32 one rounded to bf16, the model computes in bf16, the cached audio
    keys/values are bf16; integer state is untouched."""
    fp32 = model_params(pretrained.load_model(model_dir))
    bf16_model = serving.load_serving_model(model_dir, serving.ServingOptions(dtype="bfloat16"))
    assert bf16_model.config.llm.dtype == jnp.bfloat16 and bf16_model.config.htsat.param_dtype == jnp.bfloat16
    for path, value in model_params(bf16_model).items():
        reference = np.asarray(fp32[path])
        if np.issubdtype(reference.dtype, np.floating):
            assert value.dtype == jnp.bfloat16, path
            np.testing.assert_array_equal(np.asarray(value), reference.astype(ml_dtypes.bfloat16), err_msg=path)
        else:
            assert value.dtype == reference.dtype, path
    audio, audio_mask, _, _ = batch
    (k, v), _ = encode_audio_kv(bf16_model, audio, audio_mask)
    assert k.dtype == v.dtype == jnp.bfloat16
    tokens = _generate(bf16_model, batch)
    assert tokens.shape == (4, 8) and np.all((tokens >= 0) & (tokens < bf16_model.config.llm.vocab_size))
