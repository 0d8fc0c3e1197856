"""The shared key-mapping mechanism (af2_jax/convert/mapping.py) on hand-made numpy state dicts."""
from __future__ import annotations

import numpy as np
import pytest

from af2_jax.convert.mapping import (CONV2D, LINEAR, Alias, ConversionError, Derived, Tensor, export_tensors,
                                     import_tensors, reshape)
from af2_jax.param_tree import flatten, unflatten


class DictSource:
    def __init__(self, tensors: dict[str, np.ndarray]):
        self.tensors = tensors

    def keys(self) -> list[str]:
        return list(self.tensors)

    def get(self, key: str) -> np.ndarray:
        return self.tensors[key]


RNG = np.random.default_rng(0)
LAYERS, DIN, DOUT = 3, 4, 5

RULES = [
    Tensor("embed/embedding", "embed.weight"),
    Tensor("blocks/dense/kernel", "blocks.{i}.dense.weight", LINEAR),
    Tensor("blocks/dense/bias", "blocks.{i}.dense.bias"),
    Tensor("conv/kernel", "conv.weight", CONV2D),
    Tensor("heads/q", "q.weight", reshape((DIN, 2, 2), (4, DIN))),
    Alias("head.weight", same_as="embed.weight", export=False),
    Alias("old_blocks.{i}.dense.weight", same_as="blocks.{i}.dense.weight"),
    Derived(lambda: {"rope.inv_freq": np.arange(3, dtype=np.float32)}),
]


def torch_state() -> dict[str, np.ndarray]:
    state = {"embed.weight": RNG.normal(size=(7, DIN)).astype(np.float32),
             "conv.weight": RNG.normal(size=(6, 2, 3, 3)).astype(np.float32),  # (O, I, kh, kw)
             "q.weight": RNG.normal(size=(4, DIN)).astype(np.float32),
             "rope.inv_freq": np.arange(3, dtype=np.float32)}
    for i in range(LAYERS):
        state[f"blocks.{i}.dense.weight"] = RNG.normal(size=(DOUT, DIN)).astype(np.float32)
        state[f"blocks.{i}.dense.bias"] = RNG.normal(size=(DOUT,)).astype(np.float32)
        state[f"old_blocks.{i}.dense.weight"] = state[f"blocks.{i}.dense.weight"].copy()
    state["head.weight"] = state["embed.weight"].copy()
    return state


TARGETS = {"embed/embedding": ((7, DIN), np.float32), "blocks/dense/kernel": ((LAYERS, DIN, DOUT), np.float32),
           "blocks/dense/bias": ((LAYERS, DOUT), np.float32), "conv/kernel": ((3, 3, 2, 6), np.float32),
           "heads/q": ((DIN, 2, 2), np.float32)}


def test_import_places_layouts_and_stacked_axes():
    state = torch_state()
    ours = import_tensors(RULES, DictSource(state), TARGETS)
    assert sorted(ours) == sorted(TARGETS)
    for i in range(LAYERS):  # layer i's torch (out, in) weight lands transposed in slice i of the stack
        np.testing.assert_array_equal(ours["blocks/dense/kernel"][i], state[f"blocks.{i}.dense.weight"].T)
        np.testing.assert_array_equal(ours["blocks/dense/bias"][i], state[f"blocks.{i}.dense.bias"])
    np.testing.assert_array_equal(ours["conv/kernel"], np.einsum("oihw->hwio", state["conv.weight"]))
    np.testing.assert_array_equal(ours["heads/q"], state["q.weight"].reshape(DIN, 2, 2))


def test_round_trip_reproduces_every_exported_key():
    state = torch_state()
    exported = dict(export_tensors(RULES, import_tensors(RULES, DictSource(state), TARGETS)))
    # the alias with export=False (head.weight) is not written; everything else is, derived buffers included
    assert sorted(exported) == sorted(k for k in state if k != "head.weight")
    for key, value in exported.items():
        np.testing.assert_array_equal(value, state[key], err_msg=key)


def test_missing_extra_and_misshaped_keys_are_named_together():
    state = torch_state()
    del state["blocks.2.dense.bias"]
    state["unused.weight"] = np.zeros(2, np.float32)
    state["blocks.1.dense.weight"] = np.zeros((DOUT + 1, DIN), np.float32)
    state["old_blocks.1.dense.weight"] = state["blocks.1.dense.weight"]
    with pytest.raises(ConversionError) as err:
        import_tensors(RULES, DictSource(state), TARGETS)
    problems = err.value.problems
    assert "blocks.2.dense.bias" in problems["missing keys"]  # (the mis-shaped slot is also reported missing)
    assert problems["unexpected keys"] == ["unused.weight"]
    assert any(p.startswith("blocks.1.dense.weight: got (6, 4), expected (5, 4)") for p in problems["mis-shaped keys"])
    for name in ("blocks.2.dense.bias", "unused.weight", "blocks.1.dense.weight"):
        assert name in str(err.value)


def test_stack_index_beyond_the_stack_is_unexpected():
    state = torch_state()
    state[f"blocks.{LAYERS}.dense.bias"] = np.zeros(DOUT, np.float32)
    with pytest.raises(ConversionError, match=f"blocks.{LAYERS}.dense.bias"):
        import_tensors(RULES, DictSource(state), TARGETS)


def test_alias_that_differs_from_its_twin_is_an_error():
    state = torch_state()
    state["old_blocks.0.dense.weight"] = state["old_blocks.0.dense.weight"] + 1
    with pytest.raises(ConversionError) as err:
        import_tensors(RULES, DictSource(state), TARGETS)
    assert err.value.problems["keys that differ from their twin"] in (["old_blocks.0.dense.weight"],
                                                                      ["blocks.0.dense.weight"])


def test_alias_alone_fills_its_twin():
    state = torch_state()
    del state["blocks.0.dense.weight"]  # only the alias holds layer 0
    ours = import_tensors(RULES, DictSource(state), TARGETS)
    np.testing.assert_array_equal(ours["blocks/dense/kernel"][0], state["old_blocks.0.dense.weight"].T)


def test_derived_buffer_that_differs_from_recomputed_value_is_an_error():
    state = torch_state()
    state["rope.inv_freq"] = np.array([0, 1, 3], np.float32)
    with pytest.raises(ConversionError, match="rope.inv_freq"):
        import_tensors(RULES, DictSource(state), TARGETS)


def test_export_of_a_parameter_without_rule_is_an_error():
    with pytest.raises(ConversionError, match="stray/param"):
        list(export_tensors(RULES, {"stray/param": np.zeros(2)}))


def test_flatten_unflatten_inverse():
    tree = {"a": {"b": np.zeros(1), "0": {"c": np.ones(2)}}, "d": np.ones(3)}
    flat = flatten(tree)
    assert sorted(flat) == ["a/0/c", "a/b", "d"]
    assert flatten(unflatten(flat)).keys() == flat.keys()
