"""AF-CLAP on a caption test set: retrieval both ways, zero-shot counting, and the composition test.

A test set is a sequence of caption records (`af2_jax.data.captions.SyntheticCaptionSource`, or a caption manifest
read by `af2_jax.data.caption_manifests`): 'waveform' + 'sample_rate' or an 'audio' path, 'captions' (several per
clip: retrieval counts a hit when any of them ranks), optionally 'composition' = [true caption, order-swapped
caption] and, for synthetic clips, 'events' (the zero-shot counting classes come from them).

    retrieval     audio->text and text->audio recall at 1, 5, 10 over every caption of every clip
    composition   share of clips closer to their caption than to the same words in swapped order (chance 50 %)
    zero-shot     count-skill clips against one text per count ("one beep" ... "five beeps", the plainest wording)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from af2_jax.evaluation import retrieval


def clip_features(records: Sequence[Mapping[str, Any]], *, progress: bool = False
                  ) -> tuple[np.ndarray, np.ndarray, list[int], list[dict[str, str]]]:
    """(mel_fusion (N, 4, 1001, 64), longer (N,), indices of the records read, skipped records with their reason):
    the AF-CLAP front end; long clips' crops are drawn with a per-record seed, so the set is reproducible. A record
    whose audio cannot be read is skipped and named, as inference and training do."""
    from tqdm import tqdm

    from af2_jax.audio.io import AudioError
    from af2_jax.data.clap_pipeline import host_clap_features, load_clap_waveform
    from af2_jax.data.examples import RecordError

    mels, longer, kept, skipped = [], [], [], []
    for index in tqdm(range(len(records)), desc="audio features", unit="clip", disable=not progress):
        try:
            mel, is_long = host_clap_features(load_clap_waveform(records[index]), np.random.default_rng(index))
        except (AudioError, RecordError, OSError, ValueError) as e:
            skipped.append({"id": str(records[index].get("id", index)), "error": str(e)})
            continue
        mels.append(mel)
        longer.append(is_long)
        kept.append(index)
    if not kept:
        raise ValueError(f"no clip could be read ({len(skipped)} skipped; first: {skipped[0] if skipped else '-'})")
    return np.stack(mels), np.asarray(longer, bool), kept, skipped


def _count_classes(records: Sequence[Mapping[str, Any]]) -> tuple[list[int], list[list[str]], list[int]]:
    """(indices of the single-group count clips, each clip's class texts, labels): each clip's own events named
    with every count seen ("two loud beeps", "three loud beeps", ...), so the classes differ by the count alone."""
    from af2_jax.data.captions import caption_facts, noun_phrases

    chosen, groups = [], []
    for i, record in enumerate(records):
        if record.get("skill") != "count" or "events" not in record:
            continue
        facts = caption_facts(record)
        if len(facts.groups) == 1:
            chosen.append(i)
            groups.append(facts.groups[0])
    counts = sorted({g.count for g in groups})
    texts = [[noun_phrases(dataclasses.replace(g, count=n))[0] for n in counts] for g in groups]
    return chosen, texts, [counts.index(g.count) for g in groups]


def evaluate(model: Any, tokenizer: Any, records: Sequence[Mapping[str, Any]], *, batch_size: int = 16,
             progress: bool = False) -> dict[str, Any]:
    """Every metric of the module docstring, as fractions, plus the counts they are over."""
    mel, longer, kept, skipped = clip_features(records, progress=progress)
    records = [records[i] for i in kept]
    audio = retrieval.embed_audio(model, mel, longer, batch_size)
    texts, owner = [], []
    for i in range(len(records)):
        for caption in records[i]["captions"]:
            texts.append(caption)
            owner.append(i)
    text = retrieval.embed_texts(model, tokenizer, texts)
    results: dict[str, Any] = dict(retrieval.recall_at_k(audio @ text.T, owner))
    results["clips"], results["captions"], results["skipped_clips"] = len(records), len(texts), len(skipped)
    pairs = [(i, records[i]["composition"]) for i in range(len(records)) if records[i].get("composition")]
    if pairs:
        true = retrieval.embed_texts(model, tokenizer, [p[0] for _, p in pairs])
        swapped = retrieval.embed_texts(model, tokenizer, [p[1] for _, p in pairs])
        results["composition"] = retrieval.composition_accuracy(audio[[i for i, _ in pairs]], true, swapped)
        results["composition_pairs"] = len(pairs)
    chosen, class_texts, labels = _count_classes(records)
    if chosen and len(class_texts[0]) > 1:
        unique = sorted({t for texts in class_texts for t in texts})
        embedded = dict(zip(unique, retrieval.embed_texts(model, tokenizer, unique)))
        scores = np.stack([[audio[i] @ embedded[t] for t in texts] for i, texts in zip(chosen, class_texts)])
        results["zero_shot_count"] = retrieval.zero_shot_accuracy(scores, labels)
        results["zero_shot_count_chance"] = 1.0 / len(class_texts[0])
        results["zero_shot_count_clips"] = len(chosen)
    return results


PERCENT_KEYS = ("R@", "composition", "zero_shot_count")


def format_results(results: Mapping[str, Any]) -> str:
    """The metrics as a small table (percentages), with the counts they are over."""
    lines = []
    for key, value in results.items():
        if any(k in key for k in PERCENT_KEYS) and not key.endswith(("_pairs", "_clips")):
            lines.append(f"{key:28s} {100 * value:6.1f} %")
        else:
            lines.append(f"{key:28s} {value:>6}")
    return "\n".join(lines)
