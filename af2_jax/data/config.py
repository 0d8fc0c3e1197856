"""The data config: which sources a run reads, with what weights; and the tiny presets' synthetic configs.

    {'sources': [{'kind': 'synthetic' | 'manifest' | 'jsonl' | 'arrayrecord' | 'synthetic_captions' |
                          'caption_manifest', 'weight': 1.0, ...kind fields}]}

Kind fields (docs/DATA.md has the full table):
  synthetic:   split ('train' | 'test'), num_examples, skills (list of names), seed (the data's identity, not
               the shuffle's; default 0), mcq_probability (share of questions asked MMAU-style; default 0.3)
  manifest:    path (an AF2 dataset JSON), audio_root (optional), dataset (optional name), strict (default False)
  jsonl:       path, audio_root, dataset, strict
  arrayrecord: path (a folder written by af2_jax.data.tfds_builder, or one .array_record file)
AF-CLAP caption kinds (af2_jax.data.clap_pipeline; docs/CLAP_DATA.md):
  synthetic_captions: split, num_examples, skills, seed (as synthetic), num_positives, num_negatives (captions made
               per clip; default: the pipeline's M and N)
  caption_manifest: path (JSON, JSONL or a LAION webdataset folder), audio_root, dataset, strict,
               caption_format ('plain' | 'compa': "pos;neg1;neg2" strings)
An ml_collections ConfigDict or a plain dict both work.
"""
from __future__ import annotations

from typing import Any

KINDS = ("synthetic", "manifest", "jsonl", "arrayrecord", "synthetic_captions", "caption_manifest")
CAPTION_KINDS = ("synthetic_captions", "caption_manifest")  # read by the AF-CLAP pipeline only
PATHLESS_KINDS = ("synthetic", "synthetic_captions")
DEFAULT_TRAIN_EXAMPLES = 20000
DEFAULT_TEST_EXAMPLES = 512
# The short skills the tiny curriculum teaches and evaluates (counting, temporal order, pitch): a CPU budget buys a
# tiny model a few thousand examples, and every added skill divides them. The other skills stay available through
# data.sources.
CURRICULUM_SHORT_SKILLS = ("count", "order", "pitch")
# The tiny curriculum asks its questions open-form. Picking the letter of a shuffled "(a) ... (b) ..." list is a
# language skill AF2 inherits from its pretrained Qwen2.5; the tiny LLM is random and frozen, and could not learn it
# (measured in docs/RESULTS.md: every lettered answer a coin flip, even with the LLM trainable for 2000 steps).
CURRICULUM_MCQ_PROBABILITY = 0.0
# Stage 3 asks stage 1-2's order question about their beep and noise, minutes apart in 5-minute recordings: the
# tiny model then learns long range, not a new vocabulary as well. Of the long skills only long_order learns from the
# ~200 recordings a CPU budget allows; long_pitch, long_count and long_when stay at chance (docs/RESULTS.md).
CURRICULUM_LONG_SKILLS = ("long_order",)


def as_dict(config: Any) -> dict:
    """ConfigDict or mapping -> plain dict (recursively), so the rest of the code handles one type."""
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    if isinstance(config, dict):
        return {k: as_dict(v) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [as_dict(v) for v in config]
    return config


def validate(data_config: Any) -> list[dict]:
    """The config's sources as plain dicts; raises ValueError naming the bad source and field."""
    config = as_dict(data_config)
    sources = config.get("sources") if isinstance(config, dict) else None
    if not sources:
        raise ValueError("data config: 'sources' must be a non-empty list")
    for k, source in enumerate(sources):
        if not isinstance(source, dict):
            raise ValueError(f"data config: sources[{k}] must be a dict, got {type(source).__name__}")
        kind = source.get("kind")
        if kind not in KINDS:
            raise ValueError(f"data config: sources[{k}].kind must be one of {KINDS}, got {kind!r}")
        if kind not in PATHLESS_KINDS and not source.get("path"):
            raise ValueError(f"data config: sources[{k}] ({kind}) needs a 'path'")
        weight = source.get("weight", 1.0)
        if not isinstance(weight, (int, float)) or weight <= 0:
            raise ValueError(f"data config: sources[{k}].weight must be > 0, got {weight!r}")
    return sources


def default_synthetic_config(split: str = "train", *, stage: int = 1, num_examples: int | None = None,
                             seed: int = 0) -> dict:
    """The tiny presets' data: stages 1-2 train CURRICULUM_SHORT_SKILLS; stage 3 mixes long-audio skills with a replay
    of the short ones (half and half), as the paper's stage 3 adds LongAudio to the earlier data."""
    if stage not in (1, 2, 3):
        raise ValueError(f"stage must be 1, 2 or 3, got {stage}")
    n = num_examples or (DEFAULT_TRAIN_EXAMPLES if split == "train" else DEFAULT_TEST_EXAMPLES)
    short = {"kind": "synthetic", "split": split, "skills": list(CURRICULUM_SHORT_SKILLS), "num_examples": n,
             "seed": seed, "mcq_probability": CURRICULUM_MCQ_PROBABILITY, "weight": 1.0}
    if stage < 3:
        return {"sources": [short]}
    long = dict(short, skills=list(CURRICULUM_LONG_SKILLS), seed=seed + 1)
    return {"sources": [dict(short, weight=0.5), dict(long, weight=0.5)]}
