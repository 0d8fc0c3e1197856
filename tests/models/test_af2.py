"""The assembled AF2 model against NVIDIA's reference (af2_tiny fixture: end-to-end logits from audio samples and
every LM stage) and against transformers' PyTorch Qwen2 (a fresh model, gates 0, is exactly the plain LLM)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from af2_jax.convert.af2_release import import_release
from af2_jax.param_tree import flatten, unflatten
from af2_jax.convert.mapping import export_tensors
from af2_jax.convert.qwen2_hf import qwen2_rules
from af2_jax.models.af2 import AF2Model, af2_preset, text_positions
from af2_jax.models.htsat import htsat_preset


def _model_with(config, params) -> AF2Model:
    model = nnx.eval_shape(lambda: AF2Model(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    state.replace_by_pure_dict(unflatten({k: jnp.asarray(v) for k, v in params.items()}))
    return nnx.merge(graphdef, state)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, audio, audio_mask, ids, mask):
    return nnx.merge(graphdef, state)(audio, audio_mask, ids, mask)


def _logits(model, *args):
    graphdef, state = nnx.split(model)
    return np.asarray(_forward(graphdef, state, *(jnp.asarray(a) for a in args)))


@pytest.fixture(scope="module")
def reference_model(fixture_dir):
    config, params, _ = import_release(fixture_dir / "state_dict.safetensors", progress=False)
    return _model_with(config, params)


def test_logits_match_reference_end_to_end(reference_model, fixture_inputs, fixture_outputs):
    i = fixture_inputs
    logits = _logits(reference_model, i["audio_x"], i["audio_x_mask"], i["input_ids"], i["attention_mask"])
    ref = fixture_outputs["logits"]
    assert logits.shape == ref.shape and logits.dtype == np.float32
    # padded text positions included: right padding gives positions 0..T-1 as in the reference forward
    np.testing.assert_allclose(logits, ref, atol=5e-4, rtol=1e-4)
    print(f"end-to-end logits: max |diff| = {np.abs(logits - ref).max():.2e}")


def test_every_lm_stage_matches_reference(reference_model, fixture_inputs, fixture_outputs):
    """Superblock by superblock from the stored inputs of each stage (xattn i, decoder layer i, final norm)."""
    out, model = fixture_outputs, reference_model
    media = jnp.asarray(out["audio_transformer_out"])
    media_mask = jnp.asarray(out["audio_tokens_mask"])
    attention_mask = jnp.asarray(fixture_inputs["attention_mask"])
    from af2_jax.models.qwen2 import causal_attention_mask

    positions, mask = text_positions(attention_mask), causal_attention_mask(attention_mask, attention_mask.shape[1])
    x_graph, x_state = nnx.split(model.xattn)
    d_graph, d_state = nnx.split(model.llm.layers)
    for layer in range(model.config.llm.num_layers):
        block = nnx.merge(x_graph, jax.tree.map(lambda a: a[layer], x_state))
        decoder_layer = nnx.merge(d_graph, jax.tree.map(lambda a: a[layer], d_state))
        h = jnp.asarray(out[f"lm_layer{layer}_in"])
        after_xattn = block(h, block.audio_kv(media), media_mask)
        np.testing.assert_allclose(after_xattn, out[f"xattn{layer}_out"], atol=2e-4, rtol=1e-4)
        after_layer, _ = decoder_layer(jnp.asarray(out[f"xattn{layer}_out"]), positions=positions, mask=mask)
        np.testing.assert_allclose(after_layer, out[f"lm_layer{layer}_out"], atol=2e-4, rtol=1e-4)
    final = model.llm.norm(jnp.asarray(out[f"lm_layer{model.config.llm.num_layers - 1}_out"]))
    np.testing.assert_allclose(final, out["lm_final_norm"], atol=2e-4, rtol=1e-4)


@pytest.mark.slow
def test_fresh_model_is_the_plain_llm():
    """Gates start at 0: whatever the audio, logits equal transformers' Qwen2ForCausalLM with the same weights."""
    # a shallower HTSAT only to build faster: the claim is about the LM path, which the audio cannot reach
    config = af2_preset("tiny", htsat=htsat_preset("tiny", depths=(2, 2, 2, 2)))
    model = AF2Model(config, rngs=nnx.Rngs(7))
    assert not np.any(model.xattn.attn_gate[...]) and not np.any(model.xattn.ff_gate[...])
    llm_params = flatten(nnx.state(model.llm).to_pure_dict())
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**config.llm.to_hf())).eval()
    torch_state = {k: torch.from_numpy(np.array(v)) for k, v in export_tensors(qwen2_rules(config.llm), llm_params)}
    missing, unexpected = hf.load_state_dict(torch_state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied head
    hf.tie_weights()

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 295, size=(2, 9))
    attention_mask = np.ones((2, 9), np.int64)
    attention_mask[0, 6:] = 0  # right padding
    media = jnp.asarray(rng.normal(size=(2, 64, config.xattn.dim_audio)), jnp.float32)  # any audio at all
    logits, _ = model.text_logits(jnp.ones((2, 64)), jnp.asarray(ids), jnp.asarray(attention_mask), media=media)
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(attention_mask)).logits.numpy()
    valid = attention_mask == 1
    np.testing.assert_allclose(np.asarray(logits)[valid], ref[valid], atol=1e-4, rtol=1e-4)
    print(f"fresh AF2 vs transformers Qwen2: max |diff| = {np.abs(np.asarray(logits)[valid] - ref[valid]).max():.2e}")


def test_unrolled_and_rematerialised_decoders_agree(reference_model, fixture_outputs, fixture_inputs):
    """The config switches change how the superblocks run, not what they compute."""
    out = fixture_outputs
    media, media_mask = jnp.asarray(out["audio_transformer_out"]), jnp.asarray(out["audio_tokens_mask"])
    ids, mask = jnp.asarray(fixture_inputs["input_ids"]), jnp.asarray(fixture_inputs["attention_mask"])
    base, _ = reference_model.text_logits(media_mask, ids, mask, media=media)
    params = flatten(nnx.state(reference_model).to_pure_dict())
    import dataclasses

    for overrides in ({"scan_unroll": True}, {"remat_policy": "full"}):
        other = _model_with(dataclasses.replace(reference_model.config, **overrides), params)
        logits, _ = other.text_logits(media_mask, ids, mask, media=media)
        np.testing.assert_allclose(logits, base, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(logits, out["logits"], atol=5e-4, rtol=1e-4)


def _count(module, *kinds):
    state = nnx.state(module, *kinds) if kinds else nnx.state(module)
    return sum(int(np.prod(v.shape)) for v in flatten(state.to_pure_dict()).values())


def test_real_presets_have_the_reference_parameter_counts():
    """af2_reference.md section 8 (counted by instantiating NVIDIA's code, vocabulary 151669)."""
    from af2_jax.models.variables import Buffer

    big = nnx.eval_shape(lambda: AF2Model(af2_preset("3b"), rngs=nnx.Rngs(0)))
    assert _count(big.xattn, nnx.Param) == 1_359_249_480
    assert _count(big.llm, nnx.Param) == 3_085_391_872
    assert _count(big.audio_transformer, nnx.Param) == 75_538_432
    # torch counts HTSAT's unused STFT/mel bases and classifier heads as parameters; we keep them as Buffers (and
    # BatchNorm's num_batches_tracked, a torch buffer, as well)
    buffers = flatten(nnx.state(big.htsat, Buffer).to_pure_dict())
    torch_parameters = sum(int(np.prod(v.shape)) for k, v in buffers.items() if not k.endswith("num_batches_tracked"))
    assert _count(big.htsat, nnx.Param) + torch_parameters == 278_770_007
    small = nnx.eval_shape(lambda: AF2Model(af2_preset("0.5b"), rngs=nnx.Rngs(0)))
    assert round(_count(small.xattn, nnx.Param) / 1e5) == 2266  # 226.6M
    assert small.config.llm.vocab_size == 151669 and small.config.eos_token_id == 151643
