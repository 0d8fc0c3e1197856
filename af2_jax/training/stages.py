"""Curriculum stages as data: which parameters train in each stage, by regular expressions over our parameter
paths ('/'-joined, e.g. 'xattn/attn/q/kernel', 'llm/embed_tokens/embedding').

The same patterns give (a) the NNX filter that splits the trainable parameters off the model, so gradients are only
taken for them, and (b) the 'train' / 'frozen' labels of the optimizer's `optax.multi_transform`.
"""
from __future__ import annotations

import re
from typing import Sequence

import jax
from flax import nnx

from af2_jax.param_tree import leaf_path_string, path_string

TRAIN = "train"
FROZEN = "frozen"

# Stage 1 (alignment): the new audio transformer and cross-attention, plus the LLM input embeddings (the reference
# sets freeze_lm_embeddings: false). CLAP/HTSAT and the LLM decoder stay frozen.
STAGE1 = ("audio_transformer/.*", "xattn/.*", "llm/embed_tokens/.*")
# Stages 2 and 3 (fine-tuning, long audio): the same plus the HTSAT encoder (clap_config.finetune: true).
STAGE2 = STAGE1 + ("htsat/.*",)
STAGE_TRAINABLE: dict[int, tuple[str, ...]] = {1: STAGE1, 2: STAGE2, 3: STAGE2}
# 10 s windows per example: 30 s, 2 min (the paper: 1.5-2 min), 5 min
STAGE_WINDOWS: dict[int, int] = {1: 3, 2: 12, 3: 30}


class PathMatcher:
    """True for '/'-joined paths fully matching any of `patterns`."""

    def __init__(self, patterns: Sequence[str]):
        self.patterns = tuple(patterns)
        self._regex = re.compile("|".join(f"(?:{p})" for p in self.patterns)) if self.patterns else None

    def __call__(self, path: str) -> bool:
        return self._regex is not None and self._regex.fullmatch(path) is not None


def trainable_filter(patterns: Sequence[str]):
    """NNX filter selecting the `nnx.Param`s whose path matches a pattern (BatchStats and Buffers never train)."""
    matcher = PathMatcher(patterns)
    return nnx.All(nnx.Param, lambda path, _: matcher(path_string(path)))


def param_labels(patterns: Sequence[str]):
    """A label function for `optax.multi_transform`: 'train' or 'frozen' per leaf of any params pytree
    (nnx.State or pure dict), by the leaf's path."""
    matcher = PathMatcher(patterns)

    def labels(tree):
        def label(path, _):
            return TRAIN if matcher(leaf_path_string(path)) else FROZEN
        return jax.tree_util.tree_map_with_path(label, tree)

    return labels


class PatternError(ValueError):
    """A trainable pattern that selects no parameter."""


def check_patterns_match(patterns: Sequence[str], param_paths: Sequence[str]) -> None:
    """Every pattern must select at least one parameter: a typo must not silently freeze a component."""
    unmatched = [p for p in patterns if not any(PathMatcher([p])(path) for path in param_paths)]
    if unmatched:
        raise PatternError(f"trainable patterns {unmatched} match no parameter; parameter paths start with "
                         f"{sorted({path.split('/')[0] for path in param_paths})}")
