"""Build a retrieval index of a manifest's clips, for retrieved few-shot prompts (infer.py --shots K --index DIR).

    python launch/build_index.py --model <AF-CLAP model dir> --manifest train.jsonl --out runs/index
    python launch/build_index.py --model runs/af2 --manifest train.json --out runs/index --metric l2

--model is an AF-CLAP model (its audio embedding of each clip's first 10 s, as AF1 embeds with CLAP) or an AF2
model (its HTSAT tokens of the first 10 s, mean-pooled), in our pretrained format (a training workdir works too).
The manifest is a JSONL or AF2 dataset JSON of single-audio rows (the TRAINING split: queries of every split are
answered with training examples, as in AF1). The index is exact (faiss IndexFlatIP over unit vectors, or
IndexFlatL2) and written as DIR/index.faiss + DIR/entries.json (file names, ids, prompts and answers; no pickle).
Rows that cannot be read are reported and left out.
"""
from __future__ import annotations

import argparse
import logging
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import af2_jax  # noqa: E402,F401  (package-wide flax settings)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="build_index.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", required=True, help="an AF-CLAP or AF2 model directory (or a training workdir)")
    p.add_argument("--manifest", required=True, help="JSONL or AF2 dataset JSON of the training clips")
    p.add_argument("--out", required=True, help="directory for index.faiss and entries.json")
    p.add_argument("--audio-root", default=None, help="directory the manifest's audio paths are relative to")
    p.add_argument("--metric", choices=("ip", "l2"), default="ip",
                   help="ip: inner product of unit vectors (cosine); l2: squared distance (AF1); same ranking")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--overwrite", action="store_true", help="replace an index already in --out")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def read_manifest_records(path: str, audio_root: str | None) -> list[dict]:
    """The manifest's single-audio rows (few-shot and chat rows cannot be index entries: skipped with a count)."""
    from af2_jax.data import manifests

    records = manifests.read_manifest(path, audio_root=audio_root, strict=False)
    single = [r for r in records if not isinstance(r.get("audio"), list) and "dialogue" not in r]
    if len(single) < len(records):
        logging.warning("%s: %d several-audio rows (few-shot / chat) left out of the index", path,
                        len(records) - len(single))
    return single


def build(model: str, manifest: str, out: str, *, audio_root: str | None = None, metric: str = "ip",
          batch_size: int = 16, progress: bool = True, overwrite: bool = False) -> tuple[int, int]:
    """Embeds, indexes and saves; returns (entries indexed, rows left out)."""
    from tqdm import tqdm

    from af2_jax.retrieval import embed, index as index_lib

    target = pathlib.Path(out)
    if (target / index_lib.INDEX_FILE).exists() and not overwrite:
        raise FileExistsError(f"--out {out}: already holds an index (pass --overwrite to replace it)")
    records = read_manifest_records(manifest, audio_root)
    if not records:
        raise ValueError(f"{manifest}: no usable single-audio rows to index")
    embedder = embed.load_embedder(model)
    kept, failed = [], []

    def waves():
        for record in records:
            try:
                wave = embed.clip_waveform(record)
            except Exception as e:  # noqa: BLE001 - one unreadable clip must not stop the index
                failed.append(f"{record.get('id')}: {e}")
                bar.update(1)
                continue
            kept.append(record)
            yield wave

    with tqdm(total=len(records), desc="embedding clips", unit="clip", disable=not progress) as bar:
        vectors = embedder.embed(waves(), batch_size=batch_size, progress=bar.update)
    for message in failed[:10]:
        print(f"warning: left out {message}", file=sys.stderr)
    if not kept:
        raise ValueError(f"{manifest}: none of its {len(records)} clips could be read")
    index = index_lib.build_index(vectors, [embed.entry_of(r) for r in kept], metric=metric,
                                  embedding=embedder.embedding, model=embedder.model_dir,
                                  manifest=str(pathlib.Path(manifest).absolute()))
    index.save(target)
    return len(kept), len(failed)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        print("error: --batch-size must be >= 1", file=sys.stderr)
        return 2
    from af2_jax.data.manifests import ManifestError

    try:
        count, failed = build(args.model, args.manifest, args.out, audio_root=args.audio_root, metric=args.metric,
                              batch_size=args.batch_size, progress=args.progress, overwrite=args.overwrite)
    except (ManifestError, FileNotFoundError, FileExistsError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"indexed {count} clips in {args.out}" + (f" ({failed} left out: unreadable)" if failed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
