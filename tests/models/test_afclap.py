"""AF-CLAP against the golden fixture afclap_tiny (NVIDIA's CLAP_Module in fp32): the reference state dict loaded
into our model through the converter's key table (af2_jax/convert/afclap_keys.py), then every model array of the
fixture from the HTSAT image to the similarity matrix."""
from __future__ import annotations

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from af2_jax import param_tree
from af2_jax.convert.afclap_keys import afclap_rules, state_dict_keys
from af2_jax.convert.mapping import ConversionError, import_tensors
from af2_jax.convert.tensor_files import SafetensorsSource
from af2_jax.models.afclap import AFCLAPModel, afclap_preset

REPO = pathlib.Path(__file__).resolve().parents[2]

# fixture README, "Expected tolerances": HTSAT 1e-4 (the AFF path has a sigmoid gate: 2e-4), T5 hidden states 3e-4,
# text_pooled 1e-4, projections / normalised features 2e-5, similarity 1e-5
HTSAT_TOL = dict(atol=1e-4, rtol=1e-4)
AFF_TOL = dict(atol=2e-4, rtol=1e-4)
FEATURE_TOL = dict(atol=2e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def afclap_dir(afclap_fixture_dir) -> pathlib.Path:
    return afclap_fixture_dir  # tests/conftest.py: ../shared/fixtures/afclap_tiny or $AF2_JAX_FIXTURES


# ---------------------------------------------------------------------------------------------------------------

def load_reference_state(config, source) -> nnx.Module:
    """Our model filled from the reference state dict through the converter's key table (afclap_keys), which
    accounts for every key and variable and checks the shapes and the recomputed Swin buffers."""
    abstract = nnx.eval_shape(lambda: AFCLAPModel(config, rngs=nnx.Rngs(0)))
    flat = import_tensors(afclap_rules(config), source, param_tree.param_targets(abstract))
    return param_tree.model_from_flat(abstract, {k: jnp.asarray(v) for k, v in flat.items()})


@pytest.fixture(scope="module")
def reference(afclap_dir):
    from safetensors.numpy import load_file

    tensors = load_file(afclap_dir / "state_dict.safetensors")
    return load_reference_state(afclap_preset("tiny"), SafetensorsSource([afclap_dir / "state_dict.safetensors"])), \
        tensors


@pytest.fixture(scope="module")
def fixture(afclap_dir):
    return dict(np.load(afclap_dir / "inputs.npz")), dict(np.load(afclap_dir / "outputs.npz"))


def mel_fusion_from_inputs(inputs) -> np.ndarray:
    """The fixture's model input, rebuilt as its README says: 4 copies of `mel` for short clips, [mel, 3 crops] for
    the longer one."""
    mel = np.repeat(inputs["mel"][:, None], 4, axis=1)
    for i in np.flatnonzero(inputs["longer"]):
        mel[i, 1:] = inputs[f"mel_fusion_local_{i}"]
    return mel


@pytest.fixture(scope="module")
def ours(reference, fixture):
    """Every array of ours that the fixture records, from one jitted function."""
    model, _ = reference
    inputs, _ = fixture
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, mel_fusion, longer, ids, mask, all_ids, all_mask, compa_ids, compa_mask):
        m = nnx.merge(graphdef, state)
        h, pe = m.htsat, m.htsat.patch_embed
        r = {}
        image = h.to_image(mel_fusion)
        r["htsat_image"], r["htsat_image_local"] = image[:, 0], image[:, 1:]
        proj = pe.proj(image[:, 0, ..., None])  # (B, 64, 64, E)
        r["htsat_patch_proj"] = proj
        r["htsat_mel_conv2d"] = pe.mel_conv2d(image[:, 1:, ..., None])  # (B, 3, 64, 21, E)
        r["htsat_aff_out"] = pe.fusion_model(proj, pe.crop_tokens(image[:, 1:]), train=False)
        x = r["htsat_patch_embed"] = pe.fused(image[:, 0], image[:, 1:], longer)
        for s, stage in enumerate(h.stages):
            x = r[f"htsat_stage{s}"] = stage(x)
        r["htsat_final_norm"] = h.norm(x)  # raster order, as the fixture
        tokens = h.clip_tokens(mel_fusion, longer)
        r["htsat_clipwise_output"] = h.clipwise_output(tokens)
        pooled = r["htsat_embedding"] = m.audio_pooled(mel_fusion, longer)
        r["audio_proj_hidden"] = m.audio_projection.hidden(pooled)
        r["audio_proj_out"] = m.audio_projection(pooled)
        r["t5_last_hidden"] = m.t5(ids, mask)
        text = r["text_pooled"] = m.text_pooled(ids, mask)
        r["text_proj_hidden"] = m.text_projection.hidden(text)
        r["text_proj_out"] = m.text_projection(text)
        out = m(mel_fusion, longer, ids, mask)
        r.update({k: v for k, v in out.items() if not k.startswith("logit_scale")})
        r["logit_scale_a_exp"], r["logit_scale_t_exp"] = out["logit_scale_a"], out["logit_scale_t"]
        r["text_features_all"] = m.text_embedding(all_ids, all_mask)
        r["compa_text_features"] = m.text_embedding(compa_ids, compa_mask)
        r["similarity"] = m.audio_embedding(mel_fusion, longer) @ r["text_features_all"].T
        return r

    i32 = lambda name: jnp.asarray(inputs[name], jnp.int32)  # noqa: E731
    result = run(state, jnp.asarray(mel_fusion_from_inputs(inputs)), jnp.asarray(inputs["longer"]),
                 i32("input_ids"), i32("attention_mask"), i32("all_input_ids"), i32("all_attention_mask"),
                 i32("compa_input_ids"), i32("compa_attention_mask"))
    return {k: np.asarray(v) for k, v in result.items()}


def _check(name, got, expected, tol):
    diff = np.abs(got - expected).max()
    print(f"{name}: max|diff| {diff:.3g} (max|ref| {np.abs(expected).max():.3g})")
    np.testing.assert_allclose(got, expected, **tol, err_msg=name)


def test_every_reference_key_is_accounted_for(reference, afclap_dir):
    """The converter's key list is the manifest's, in order; the one unstored alias is the tied embedding; the
    state dict converts with nothing left over (import_tensors raises otherwise, checking the 26 recomputed Swin
    buffers bit for bit); an unknown key is named."""
    import json

    _, tensors = reference
    manifest = [json.loads(line) for line in (afclap_dir / "state_dict_keys.json").read_text().splitlines() if line]
    assert state_dict_keys(afclap_preset("tiny")) == [e["key"] for e in manifest]
    assert {e["key"] for e in manifest if e["stored"]} == set(tensors)
    aliases = {e["key"]: e["alias_of"] for e in manifest if not e["stored"]}
    assert aliases == {"module.text_branch.encoder.embed_tokens.weight": "module.text_branch.shared.weight"}
    buffers = [k for k in tensors if re.search(r"\.(relative_position_index|attn_mask)$", k)]
    assert len(buffers) == 18 + 8  # the 41 buffers: 5 BatchNorms x 3 (stored by us) + 18 indices + 8 shift masks
    extra = {**tensors, "module.audio_branch.something_new.weight": np.zeros(1, np.float32)}
    with pytest.raises(ConversionError, match="something_new"):
        load_reference_state(afclap_preset("tiny"), _DictSource(extra))


class _DictSource:
    def __init__(self, tensors):
        self.tensors = tensors

    def keys(self):
        return list(self.tensors)

    def get(self, key):
        return self.tensors[key]

    def shape(self, key):
        return tuple(self.tensors[key].shape)


def test_htsat_matches_fixture(ours, fixture):
    inputs, out = fixture
    longer = np.flatnonzero(inputs["longer"])
    assert list(longer) == [3]
    _check("htsat_image", ours["htsat_image"], out["htsat_image"], HTSAT_TOL)
    _check("htsat_image_local_3", ours["htsat_image_local"][3], out["htsat_image_local_3"], HTSAT_TOL)
    # the reference's maps are channels-first
    _check("htsat_patch_proj", ours["htsat_patch_proj"][longer].transpose(0, 3, 1, 2), out["htsat_patch_proj"],
           HTSAT_TOL)
    _check("htsat_mel_conv2d", ours["htsat_mel_conv2d"][3].transpose(0, 3, 1, 2), out["htsat_mel_conv2d"], HTSAT_TOL)
    _check("htsat_aff_out", ours["htsat_aff_out"][longer].transpose(0, 3, 1, 2), out["htsat_aff_out"], AFF_TOL)
    _check("htsat_patch_embed", ours["htsat_patch_embed"], out["htsat_patch_embed"], AFF_TOL)
    for name in [f"htsat_stage{s}" for s in range(4)] + ["htsat_final_norm", "htsat_embedding",
                                                         "htsat_clipwise_output"]:
        _check(name, ours[name], out[name], HTSAT_TOL)
    # the fused clip really differs from its unfused global map (the fusion path is exercised)
    unfused = ours["htsat_patch_proj"][3]
    assert np.abs(ours["htsat_aff_out"][3] - unfused).max() > 0.1


def test_text_and_joint_space_match_fixture(ours, fixture):
    _, out = fixture
    _check("t5_last_hidden", ours["t5_last_hidden"], out["t5_last_hidden"], dict(atol=3e-4, rtol=1e-4))
    _check("text_pooled", ours["text_pooled"], out["text_pooled"], dict(atol=1e-4, rtol=1e-4))
    for name in ("audio_proj_hidden", "audio_proj_out", "text_proj_hidden", "text_proj_out", "audio_features",
                 "text_features", "audio_features_mlp", "text_features_mlp", "text_features_all",
                 "compa_text_features"):
        _check(name, ours[name], out[name], FEATURE_TOL)
    _check("similarity", ours["similarity"], out["similarity"], dict(atol=1e-5, rtol=1e-5))
    for name in ("logit_scale_a_exp", "logit_scale_t_exp"):
        _check(name, np.reshape(ours[name], (1,)), out[name], dict(atol=0, rtol=1e-6))
    norms = np.linalg.norm(ours["audio_features"], axis=-1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-6)


def test_raw_logit_scales_and_eval_dropout(reference, fixture):
    model, _ = reference
    inputs, out = fixture
    np.testing.assert_array_equal(np.reshape(model.logit_scale_a[...], (1,)), out["logit_scale_a"])
    np.testing.assert_array_equal(np.reshape(model.logit_scale_t[...], (1,)), out["logit_scale_t"])
    # the transforms' dropout: off when deterministic (rngs ignored), on and seeded otherwise
    features = jnp.asarray(out["audio_features"])
    base = model.audio_transform(features)
    a = model.audio_transform(features, key=jax.random.key(0))
    b = model.audio_transform(features, key=jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.abs(np.asarray(a) - np.asarray(base)).max() > 1e-3
    with pytest.raises(ValueError, match="rngs"):
        model(jnp.zeros((1, 4, 1001, 64)), jnp.zeros((1,), bool), jnp.asarray(inputs["input_ids"][:1], jnp.int32),
              jnp.asarray(inputs["attention_mask"][:1], jnp.int32), deterministic=False)
    with pytest.raises(ValueError, match="77"):
        model.text_embedding(jnp.zeros((1, 10), jnp.int32), jnp.ones((1, 10), jnp.int32))


def test_front_end_to_embedding_matches_filelist(reference, fixture):
    """wav_pcm16_* -> our front end (af2_jax.audio.clap_features) -> our model = the reference's
    get_audio_embedding_from_filelist, with the fixture's crop starts."""
    from af2_jax.audio.clap_features import clap_audio_features, pcm16_to_float

    model, _ = reference
    inputs, out = fixture
    feats = [clap_audio_features(pcm16_to_float(inputs[f"wav_pcm16_{i}"]), starts=(25, 180, 314) if i == 3 else None)
             for i in range(4)]
    mel_fusion = jnp.asarray(np.stack([f[0] for f in feats]))
    longer = np.array([f[1] for f in feats])
    np.testing.assert_array_equal(longer, inputs["longer"])
    got = np.asarray(jax.jit(lambda mf, lo: model.audio_embedding(mf, lo))(mel_fusion, jnp.asarray(longer)))
    _check("audio_embedding_filelist", got, out["audio_embedding_filelist"], dict(atol=1e-4, rtol=1e-4))


def test_audio_half_is_af2s_htsat_and_presets():
    """The htsat subtree has exactly AF2's parameter paths and shapes (AF2's `htsat=` init without renaming);
    presets; every variable of the large model maps onto a mesh; the large model's size is the reference's."""
    from af2_jax import sharding
    from af2_jax.models.af2 import AF2Model, af2_preset

    tiny = afclap_preset("tiny")
    assert tiny.htsat == af2_preset("tiny").htsat
    ours = param_tree.param_targets(nnx.eval_shape(lambda: AFCLAPModel(tiny, rngs=nnx.Rngs(0))))
    af2 = param_tree.param_targets(nnx.eval_shape(lambda: AF2Model(af2_preset("tiny"), rngs=nnx.Rngs(0))))
    assert {k: v for k, v in ours.items() if k.startswith("htsat/")} == \
        {k: v for k, v in af2.items() if k.startswith("htsat/")}
    curriculum = afclap_preset("tiny", htsat=dict(depths=(2, 2, 2, 2)))
    assert curriculum.htsat.depths == (2, 2, 2, 2) and curriculum.htsat.embed_dim == 16
    assert afclap_preset("tiny", dtype=jnp.bfloat16).t5.dtype == jnp.bfloat16

    large = afclap_preset("large")
    assert (large.joint_dim, large.text_width, large.audio_width) == (512, 1024, 2048)
    np.testing.assert_allclose(large.logit_scale_init, 2.659260, atol=1e-6)
    state = nnx.state(nnx.eval_shape(lambda: AFCLAPModel(large, rngs=nnx.Rngs(0))))
    flat = param_tree.flatten(state.to_pure_dict())
    # afclap_reference.md: 623,150,937 unique parameter tensors' elements (torchlibrosa bases and AudioSet heads
    # included, which are Buffers here; BatchNorm statistics and counters are buffers there and not counted)
    counted = sum(int(np.prod(v.shape)) for k, v in flat.items()
                  if not re.search(r"/(mean|var|num_batches_tracked)$", k))
    assert counted == 623_150_937
    mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
    specs = param_tree.flatten(jax.tree.map(lambda s: s.spec, sharding.state_shardings(state, mesh)).to_pure_dict())
    assert specs["t5/layers/attention/query/kernel"] == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert specs["text_projection/fc1/kernel"] == jax.sharding.PartitionSpec("fsdp", "tensor")
    with pytest.raises(KeyError, match="unknown AF-CLAP preset"):
        afclap_preset("huge")
    with pytest.raises(ValueError, match="fusion"):
        afclap_preset("tiny", htsat=dict(enable_fusion=False))


# ---------------------------------------------------------------------------------------------------------------
# the text tokenizer (af2_jax.clap_tokenizer)

def test_tokenizer_reproduces_fixture_ids(afclap_dir, fixture):
    """The fixture's tokenizer.json on config.json's texts gives the stored ids and masks (incl. the 90-word text
    truncated to 76 words + </s>)."""
    import json

    from af2_jax.clap_tokenizer import ClapTokenizer

    inputs, _ = fixture
    texts = json.loads((afclap_dir / "config.json").read_text())["texts"]
    tok = ClapTokenizer.from_file(afclap_dir / "tokenizer.json")
    for key, prefix in (("pairs (input_ids)", ""), ("all (all_input_ids)", "all_"),
                        ("compa (compa_input_ids)", "compa_")):
        ids, mask = tok(texts[key])
        assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == (len(texts[key]), 77)
        np.testing.assert_array_equal(ids, inputs[f"{prefix}input_ids"], err_msg=key)
        np.testing.assert_array_equal(mask, inputs[f"{prefix}attention_mask"], err_msg=key)
    ids, mask = tok(texts["all (all_input_ids)"][-1])
    assert mask.sum() == 77 and ids[0, -1] == tok.eos_id == 1


def test_tokenizer_matches_transformers_call(tmp_path):
    """A trained BPE and a WordLevel tokenizer against transformers' PreTrainedTokenizerFast called as the reference
    calls T5Tokenizer (padding='max_length', truncation=True, max_length=77), around the truncation boundary."""
    from transformers import PreTrainedTokenizerFast

    from af2_jax.clap_tokenizer import ClapTokenizer, train_tokenizer

    rng = np.random.default_rng(0)
    words = [f"{a}{b}" for a in ("bird", "dog", "car", "rain", "bell") for b in ("", "s", "ing", "ed")]
    corpus = [" ".join(rng.choice(words, rng.integers(3, 12))) for _ in range(200)]
    texts = [" ".join(rng.choice(words, n)) for n in (0, 1, 5, 75, 76, 77, 78, 120)] + ["Unseen WORDS zz", "a  b"]
    for kind, size in (("bpe", 60), ("wordlevel", 1000)):
        ours = train_tokenizer(corpus, kind=kind, vocab_size=size)
        assert [ours._raw.id_to_token(i) for i in range(3)] == ["<pad>", "</s>", "<unk>"]
        file = ours.save(tmp_path / kind)
        hf = PreTrainedTokenizerFast(tokenizer_file=str(file), pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
        expected = hf(texts, padding="max_length", truncation=True, max_length=77, return_tensors="np")
        for tok in (ours, ClapTokenizer.from_file(tmp_path / kind)):  # also after a save / load round trip
            ids, mask = tok(texts)
            np.testing.assert_array_equal(ids, expected["input_ids"], err_msg=kind)
            np.testing.assert_array_equal(mask, expected["attention_mask"], err_msg=kind)
        assert (ids[:, -1][mask[:, -1] == 1] == 1).all()  # a truncated text still ends in </s>
        assert train_tokenizer(corpus, kind=kind, vocab_size=size)._raw.get_vocab() == ours._raw.get_vocab()


def test_tokenizer_errors(tmp_path):
    import tokenizers

    from af2_jax.clap_tokenizer import ClapTokenizer, ClapTokenizerError, train_tokenizer

    with pytest.raises(ClapTokenizerError, match="no tokenizer.json"):
        ClapTokenizer.from_file(tmp_path / "missing")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ClapTokenizerError, match="not a readable"):
        ClapTokenizer.from_file(tmp_path)
    bare = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "</s>": 1}, unk_token="a"))
    with pytest.raises(ClapTokenizerError, match="<pad>"):
        ClapTokenizer(bare)
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        train_tokenizer(["a b"], kind="unigram")
    tok = train_tokenizer(["a dog barks"], context_length=5)
    ids, mask = tok(["a dog barks", "barks barks barks barks barks barks"])
    np.testing.assert_array_equal(mask, [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    assert tok.decode(ids[0]) == "a dog barks"
