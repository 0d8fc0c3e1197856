"""Data config sources -> random-access record sequences, blended by weight into one grain MapDataset."""
from __future__ import annotations

import grain

from af2_jax.data import config as data_config_lib


def make_source(source: dict):
    """One source entry -> a sequence of record dicts (`__len__` + `__getitem__`)."""
    kind = source["kind"]
    if kind == "synthetic":
        from af2_jax.data.synthetic import MCQ_PROBABILITY, SHORT_SKILLS, SyntheticSource

        return SyntheticSource(source.get("split", "train"), int(source.get("num_examples", 10000)),
                               seed=int(source.get("seed", 0)), skills=tuple(source.get("skills") or SHORT_SKILLS),
                               mcq_probability=float(source.get("mcq_probability", MCQ_PROBABILITY)))
    if kind in ("manifest", "jsonl"):
        from af2_jax.data import manifests

        read = manifests.read_jsonl if kind == "jsonl" else manifests.read_af2_manifest
        records = read(source["path"], audio_root=source.get("audio_root"), dataset=source.get("dataset"),
                       strict=bool(source.get("strict", False)))
        if not records:
            raise ValueError(f"{source['path']}: no usable records")
        return records
    if kind == "synthetic_captions":  # AF-CLAP: clips with paraphrases and hard negatives (data/captions.py)
        from af2_jax.data.captions import SyntheticCaptionSource
        from af2_jax.data.synthetic import SHORT_SKILLS

        return SyntheticCaptionSource(source.get("split", "train"), int(source.get("num_examples", 10000)),
                                      seed=int(source.get("seed", 0)),
                                      skills=tuple(source.get("skills") or SHORT_SKILLS),
                                      num_positives=int(source.get("num_positives", 4)),
                                      num_negatives=int(source.get("num_negatives", 4)))
    if kind == "caption_manifest":  # AF-CLAP: JSON / JSONL / LAION webdataset folder of captioned audio
        from af2_jax.data import caption_manifests

        records = caption_manifests.read_caption_manifest(
            source["path"], audio_root=source.get("audio_root"), dataset=source.get("dataset"),
            strict=bool(source.get("strict", False)), caption_format=source.get("caption_format", "plain"))
        if not records:
            raise ValueError(f"{source['path']}: no usable caption records")
        return records
    if kind == "arrayrecord":
        from af2_jax.data.tfds_builder import ArrayRecordSource

        return ArrayRecordSource(source["path"], source.get("split", "train"))
    raise ValueError(f"unknown source kind {kind!r}")


def blend(data_config, *, seed: int, shuffle: bool = True, epochs: int | None = None) -> grain.MapDataset:
    """All sources, each shuffled by its own seed and repeated `epochs` times (None: forever), mixed by weight.

    Deterministic in `seed`. With several sources and finite epochs, the blend ends when the first source (in
    proportion to its weight) runs out, as grain's MapDataset.mix does.
    """
    sources = data_config_lib.validate(data_config)
    datasets, weights = [], []
    for k, source in enumerate(sources):
        ds = grain.MapDataset.source(make_source(source))
        if shuffle:
            ds = ds.shuffle(seed=seed * 1000003 + k)  # every source its own permutation, re-drawn each epoch
        datasets.append(ds.repeat(epochs))
        weights.append(float(source.get("weight", 1.0)))
    if len(datasets) == 1:
        return datasets[0]
    return grain.MapDataset.mix(datasets, weights)
