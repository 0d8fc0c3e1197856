"""Pack a manifest's audio into ArrayRecord shards with a TFDS builder, and read them back as a Grain source.

Works without TensorFlow: tensorflow_datasets 4.9 builds the `array_record` file format and reads it through
`as_data_source()` with numpy only (checked in tests/data/test_tfds_builder.py). Each example stores the audio
already prepared as the reference prepares it (mono, 16 kHz, peak-normalised, int16 round trip, cropped to
`max_seconds` from the row's start), so reading is exact and needs no decoder or resampler:

    audio        int16 (samples,)   the prepared waveform times 32767 (exact: prepared samples are k / 32767)
    sample_rate  int32              16000
    prompt, answer, id, dataset     text

Rows whose audio cannot be read are skipped, counted and reported (the build does not stop).

    python -m af2_jax.data.tfds_builder --manifest train=data/train.json --manifest test=data/test.jsonl --out DIR
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import pathlib
import shutil
import sys

import numpy as np

NAME = "af2_audio"
BUILD_INPUTS_FILE = "af2_build_inputs.json"
DEFAULT_MAX_SECONDS = 300.0  # 30 windows = 5 minutes, AF2's longest context


@functools.lru_cache(maxsize=None)
def _builder_class():
    """Defined lazily (importing tensorflow_datasets takes seconds) and once (TFDS registers names globally)."""
    import tensorflow_datasets as tfds

    class Af2Audio(tfds.core.GeneratorBasedBuilder):
        """Audio-question-answer records for AF2 (see af2_jax/data/tfds_builder.py)."""

        name = NAME
        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "Prepared 16 kHz int16 audio, prompt, answer."}
        # No checksums file or package resources: without this, TFDS probes `importlib_resources` (absent here).
        code_path = None

        def __init__(self, *, splits=None, max_seconds: float = DEFAULT_MAX_SECONDS, **kwargs):
            # splits: {split name: manifest path or a sequence of records}; only needed to build.
            self._splits = dict(splits or {})
            self._max_seconds = max_seconds
            self.num_skipped = 0
            super().__init__(**kwargs)

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                description="AF2 audio QA records: prepared 16 kHz audio (int16), prompt and answer.",
                features=tfds.features.FeaturesDict({
                    "audio": tfds.features.Tensor(shape=(None,), dtype=np.int16),
                    "sample_rate": tfds.features.Scalar(dtype=np.int32),
                    "prompt": tfds.features.Text(),
                    "answer": tfds.features.Text(),
                    "id": tfds.features.Text(),
                    "dataset": tfds.features.Text(),
                }),
            )

        def _split_generators(self, dl_manager):
            if not self._splits:
                raise ValueError("Af2Audio: pass splits={'train': manifest, ...} to build")
            return {name: self._generate_examples(source) for name, source in self._splits.items()}

        def _generate_examples(self, source):
            records = source
            if isinstance(source, (str, pathlib.Path)):
                from af2_jax.data.manifests import read_manifest

                records = read_manifest(source, strict=False)
            for index, record in enumerate(records):
                example = encode_record(record, self._max_seconds)
                if example is None:
                    self.num_skipped += 1
                    continue
                yield f"{index:09d}", example

    return Af2Audio


def encode_record(record: dict, max_seconds: float = DEFAULT_MAX_SECONDS) -> dict | None:
    """A record -> the stored example, or None (logged) if its audio cannot be read."""
    from af2_jax.audio.windows import WINDOW_SAMPLES, SAMPLE_RATE
    from af2_jax.data.examples import INT16_SCALE, load_waveform

    max_windows = max(1, int(np.ceil(max_seconds * SAMPLE_RATE / WINDOW_SAMPLES)))
    try:
        wave = load_waveform(record, max_windows)[: int(max_seconds * SAMPLE_RATE)]
    except Exception as error:  # noqa: BLE001 - one bad file must not stop packing the rest
        logging.warning("skipped %s: %s: %s", record.get("id"), type(error).__name__, error)
        return None
    return {
        "audio": np.rint(wave.astype(np.float64) * INT16_SCALE).astype(np.int16),
        "sample_rate": SAMPLE_RATE,
        "prompt": record["prompt"],
        "answer": record["answer"],
        "id": str(record.get("id", "")),
        "dataset": str(record.get("dataset", "")),
    }


def build_inputs(splits: dict, max_seconds: float) -> dict:
    """What a build is made from: each split's manifest (path and a hash of its content) or in-memory records (a
    hash of their text fields), and the settings. Stored beside the shards as BUILD_INPUTS_FILE."""
    described = {}
    for name, source in sorted(splits.items()):
        if isinstance(source, (str, pathlib.Path)):
            path = pathlib.Path(source).absolute()
            if not path.is_file():
                raise FileNotFoundError(f"split {name}: manifest {path} not found")
            described[name] = {"manifest": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
        else:
            text = json.dumps([[str(r.get(k, "")) for k in ("id", "audio", "prompt", "answer")] for r in source])
            described[name] = {"records": len(source), "sha256": hashlib.sha256(text.encode()).hexdigest()}
    return {"splits": described, "max_seconds": float(max_seconds)}


def build(splits: dict, out_dir, *, max_seconds: float = DEFAULT_MAX_SECONDS, overwrite: bool = False
          ) -> pathlib.Path:
    """Build the dataset under `out_dir`; returns the folder holding the shards (out_dir/af2_audio/1.0.0).

    TFDS reuses a dataset already built there whatever it was built from; so a build from the same manifests
    (same content) and settings is reused, one from others is an error unless `overwrite` rebuilds it."""
    import tensorflow_datasets as tfds

    inputs = build_inputs(splits, max_seconds)
    builder = _builder_class()(splits=splits, max_seconds=max_seconds, data_dir=str(out_dir),
                               file_format="array_record")
    dataset_dir = pathlib.Path(builder.data_dir)
    if (dataset_dir / "dataset_info.json").is_file():
        stored = dataset_dir / BUILD_INPUTS_FILE
        previous = json.loads(stored.read_text()) if stored.is_file() else None
        if previous == inputs:
            logging.info("%s: already built from the same manifests and settings; reusing it", dataset_dir)
            return dataset_dir
        if not overwrite:
            raise FileExistsError(
                f"{dataset_dir} already holds a dataset built from "
                f"{previous['splits'] if previous else 'unrecorded inputs'}; pass --overwrite to rebuild it from "
                f"{inputs['splits']}, or choose another --out")
        shutil.rmtree(dataset_dir)
        builder = _builder_class()(splits=splits, max_seconds=max_seconds, data_dir=str(out_dir),
                                   file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(max_examples_per_split=None))
    (dataset_dir / BUILD_INPUTS_FILE).write_text(json.dumps(inputs, indent=1) + "\n")
    if builder.num_skipped:
        logging.warning("%d rows skipped (unreadable audio)", builder.num_skipped)
    return dataset_dir


def _find_dataset_dir(path) -> pathlib.Path:
    path = pathlib.Path(path)
    if (path / "dataset_info.json").is_file():
        return path
    found = sorted(p.parent for p in path.glob("**/dataset_info.json"))
    if not found:
        raise FileNotFoundError(f"{path}: no built dataset (no dataset_info.json below it)")
    if len(found) > 1:
        raise ValueError(f"{path}: several datasets below it ({[str(p) for p in found]}); pass one")
    return found[0]


class ArrayRecordSource:
    """Random access to one split of a built dataset, yielding pipeline records ('audio_int16' + text).

    Opens the shards lazily, so it pickles cheaply into Grain's worker processes."""

    def __init__(self, path, split: str = "train"):
        self.dataset_dir = _find_dataset_dir(path)
        self.split = split
        self._source = None
        self._length = len(self._open())

    def _open(self):
        if self._source is None:
            import tensorflow_datasets as tfds

            sources = tfds.builder_from_directory(str(self.dataset_dir)).as_data_source()
            if self.split not in sources:
                raise KeyError(f"{self.dataset_dir}: no split {self.split!r} (has {sorted(sources)})")
            self._source = sources[self.split]
        return self._source

    def __getstate__(self):
        return {**self.__dict__, "_source": None}

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict:
        row = self._open()[index]
        text = lambda v: v.decode("utf-8") if isinstance(v, bytes) else str(v)  # noqa: E731
        return {"id": text(row["id"]), "audio_int16": np.asarray(row["audio"], np.int16),
                "sample_rate": int(row["sample_rate"]), "prompt": text(row["prompt"]),
                "answer": text(row["answer"]), "dataset": text(row["dataset"]), "start": 0.0, "duration": None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Pack manifests' audio into ArrayRecord shards (TFDS, no TF).")
    parser.add_argument("--manifest", action="append", required=True,
                        help="[split=]path of an AF2 JSON or a JSONL manifest; repeat for more splits")
    parser.add_argument("--split", default="train", help="split name for a --manifest given without one")
    parser.add_argument("--out", required=True, help="output data_dir")
    parser.add_argument("--max-seconds", type=float, default=DEFAULT_MAX_SECONDS)
    parser.add_argument("--overwrite", action="store_true",
                        help="rebuild when --out already holds a dataset built from other manifests")
    args = parser.parse_args(argv)
    splits = {}
    for item in args.manifest:
        split, _, path = item.rpartition("=") if "=" in item else (args.split, "", item)
        if split in splits:
            parser.error(f"split {split!r} given twice")
        splits[split] = path
    logging.basicConfig(level=logging.INFO)
    try:
        out = build(splits, args.out, max_seconds=args.max_seconds, overwrite=args.overwrite)
    except (FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
