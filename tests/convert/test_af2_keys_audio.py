"""HTSAT / audio-transformer key tables against the reference state dict of the golden fixture."""
import json

import numpy as np
import pytest
import torch
from flax import nnx

from af2_jax import param_tree
from af2_jax.convert import af2_keys
from af2_jax.convert.mapping import ConversionError, export_tensors, import_tensors
from af2_jax.convert.tensor_files import SafetensorsSource, TorchFileSource
from af2_jax.models.audio_transformer import AudioTransformer, audio_transformer_preset
from af2_jax.models.htsat import HTSAT, htsat_preset

HTSAT_PREFIX, AT_PREFIX = "clap.nvclap.", "audio_transformer_clap."


class DictSource:
    def __init__(self, tensors):
        self.tensors = tensors

    def keys(self):
        return list(self.tensors)

    def get(self, key):
        return self.tensors[key]


@pytest.fixture(scope="module")
def reference(fixture_dir):
    """The fixture's HTSAT and audio-transformer tensors, and its manifest entries for them."""
    source = SafetensorsSource([fixture_dir / "state_dict.safetensors"])
    manifest = [e for e in json.loads((fixture_dir / "state_dict_keys.json").read_text())
                if e["key"].startswith((HTSAT_PREFIX, AT_PREFIX))]
    tensors = {k: source.get(k) for k in source.keys() if k.startswith((HTSAT_PREFIX, AT_PREFIX))}
    return tensors, manifest


def _tables(ours_prefix=("", "")):
    htsat_config, at_config = htsat_preset("tiny"), audio_transformer_preset("tiny")
    rules = (af2_keys.htsat_rules(htsat_config, ours_prefix=ours_prefix[0])
             + af2_keys.audio_transformer_rules(at_config, ours_prefix=ours_prefix[1]))
    targets = {}
    for prefix, make in zip(ours_prefix, (lambda: HTSAT(htsat_config, rngs=nnx.Rngs(0)),
                                          lambda: AudioTransformer(at_config, rngs=nnx.Rngs(0)))):
        targets.update({prefix + k: v for k, v in param_tree.param_targets(nnx.eval_shape(make)).items()})
    return rules, targets


def test_round_trip_is_bit_exact(reference):
    tensors, manifest = reference
    assert all(e["stored"] and e["alias_of"] is None for e in manifest)  # nothing to resolve for these components
    rules, targets = _tables(("htsat/", "audio_transformer/"))  # mounted as inside the AF2 model
    ours = import_tensors(rules, DictSource(tensors), targets)
    assert set(ours) == set(targets)
    exported = dict(export_tensors(rules, ours))
    assert sorted(exported) == sorted(e["key"] for e in manifest)
    for entry in manifest:
        key, value = entry["key"], exported[entry["key"]]
        assert value.dtype == np.dtype(entry["dtype"]) and list(value.shape) == entry["shape"], key
        np.testing.assert_array_equal(value, tensors[key], err_msg=key)
    # the recomputed buffers came from the table, not from the input
    derived = af2_keys.htsat_structural_buffers(htsat_preset("tiny"))
    assert sum(k.endswith("attn_mask") for k in derived) == 8  # odd blocks of stages 0-2 (1 + 1 + 6)
    assert {k for k in exported if k.endswith(("relative_position_index", "attn_mask", "inv_freq"))} == (
        set(derived) | {AT_PREFIX + "position_enc.inv_freq"})


def test_problems_are_all_named_at_once(reference):
    tensors, _ = reference
    rules, targets = _tables()
    broken = dict(tensors)
    missing = HTSAT_PREFIX + "layers.2.blocks.7.mlp.fc1.bias"
    misshaped = AT_PREFIX + "layer_stack.1.slf_attn.w_qs.weight"
    del broken[missing]
    broken[misshaped] = np.zeros((128, 64), np.float32)
    broken[HTSAT_PREFIX + "layers.1.blocks.9.norm1.weight"] = np.zeros(32, np.float32)  # beyond the stage's depth
    broken[AT_PREFIX + "extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ConversionError) as err:
        import_tensors(rules, DictSource(broken), targets)
    problems, message = err.value.problems, str(err.value)
    assert missing in problems["missing keys"]  # (the mis-shaped slice is reported as not filled as well)
    assert len(problems["mis-shaped keys"]) == 1 and misshaped in problems["mis-shaped keys"][0]
    assert len(problems["unexpected keys"]) == 2
    for name in (missing, misshaped, "layers.1.blocks.9.norm1.weight", "extra.weight"):
        assert name in message


def test_wrong_recomputed_buffer_is_named(reference):
    tensors, _ = reference
    rules, targets = _tables()
    for key in (HTSAT_PREFIX + "layers.0.blocks.1.attn_mask",
                HTSAT_PREFIX + "layers.3.blocks.0.attn.relative_position_index", AT_PREFIX + "position_enc.inv_freq"):
        broken = dict(tensors)
        broken[key] = broken[key].copy()
        broken[key].flat[5] += 1
        with pytest.raises(ConversionError) as err:
            import_tensors(rules, DictSource(broken), targets)
        assert err.value.problems == {"buffers that differ from the recomputed value": [key]}


def test_af_clap_checkpoint_form(reference, tmp_path):
    """clap_ckpt/*.pt holds `module.audio_branch.*` (plus the text branch) under 'state_dict'; stripping the prefix
    gives the same tensors through the same table with an empty prefix."""
    tensors, _ = reference
    htsat_tensors = {k[len(HTSAT_PREFIX):]: v for k, v in tensors.items() if k.startswith(HTSAT_PREFIX)}
    state = {"module.audio_branch." + k: torch.from_numpy(np.array(v)) for k, v in htsat_tensors.items()}
    state["module.text_branch.encoder.weight"] = torch.zeros(3)
    state["module.audio_projection.0.weight"] = torch.zeros(2, 2)
    torch.save({"epoch": 16, "state_dict": state}, tmp_path / "epoch_16.pt")
    config = htsat_preset("tiny")
    targets = param_tree.param_targets(nnx.eval_shape(lambda: HTSAT(config, rngs=nnx.Rngs(0))))
    from_pt = import_tensors(af2_keys.htsat_rules(config, prefix=""),
                             TorchFileSource(tmp_path / "epoch_16.pt", select_prefix="module.audio_branch."), targets)
    from_safetensors = import_tensors(af2_keys.htsat_rules(config),
                                      DictSource({k: v for k, v in tensors.items() if k.startswith(HTSAT_PREFIX)}),
                                      targets)
    assert set(from_pt) == set(from_safetensors)
    for path in from_pt:
        np.testing.assert_array_equal(from_pt[path], from_safetensors[path], err_msg=path)


def test_large_tables_cover_the_reference_key_counts():
    """af2_reference.md section 7: HTSAT-large has 317 keys under clap.nvclap., the audio transformer 39."""
    for rules, make, expected in [
        (af2_keys.htsat_rules(htsat_preset("large")), lambda: HTSAT(htsat_preset("large"), rngs=nnx.Rngs(0)), 317),
        (af2_keys.audio_transformer_rules(audio_transformer_preset("large")),
         lambda: AudioTransformer(audio_transformer_preset("large"), rngs=nnx.Rngs(0)), 39)]:
        targets = param_tree.param_targets(nnx.eval_shape(make))
        zeros = {p: np.broadcast_to(np.zeros((), dtype), shape) for p, (shape, dtype) in targets.items()}
        shapes = {k: v.shape for k, v in export_tensors(rules, zeros)}
        assert len(shapes) == expected
    assert shapes[AT_PREFIX + "position_enc.inv_freq"] == (64,)
