"""The ``tfrecord`` data stage: images in sharded TFRecord files, streamed.

The files are found by glob (working directory first, then the spec's folder). The
``manifest.json`` that ``dlpipe convert`` writes next to them gives the record layout,
the class names, each file's record count and split; without it the stage counts
the records (one read of every file) and cuts splits itself. Splits are whole files:
``splits`` names them, else the manifest does, else a seeded permutation of the files
is cut by ``val_fraction`` and ``test_fraction``. Nothing is decoded before training
except a bounded sample for the normalization statistics.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dlpipe.data import SPLITS, StreamSource
from dlpipe.errors import DlpipeError
from dlpipe.stages.data.streaming import RecordLayout, TFRecordSource, publish_stream

#: The file ``dlpipe convert`` writes next to the shards, and its ``format`` value.
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "dlpipe-tfrecord"


def tfrecord(ctx: Any, params: Any) -> None:
    patterns = params.splits or {"all": params.files}
    matched = {name: _match(ctx, pattern) for name, pattern in patterns.items()}
    files = sorted({f for found in matched.values() for f in found})
    manifest = read_manifest(Path(files[0]).parent / MANIFEST)
    by_name = {shard["file"]: shard for shard in manifest.get("shards", [])}
    layout = _layout(params, manifest)
    counts, top_label = _counts(files, by_name, layout)
    class_names = _class_names(params, manifest, layout, top_label)
    parts = _split(ctx, params, matched, files, counts, by_name)

    channels = 1 if (params.color_mode or manifest.get("color_mode")) == "grayscale" else 3
    if layout.image_format == "raw":
        assert layout.stored_shape is not None  # checked by TfrecordFeatures
        channels = layout.stored_shape[2]
    size = params.image_size or _first_image_size(files[0], layout)
    shape = (int(size[0]), int(size[1]), channels)
    sources: dict[str, StreamSource] = {
        split: TFRecordSource(chosen, [counts[f] for f in chosen], layout, shape,
                              params.shuffle_buffer)
        for split, chosen in parts.items()
    }
    name = Path(files[0]).parent.name or "tfrecord"
    publish_stream(ctx, params, name, sources, class_names, image_size=(shape[0], shape[1]))


def read_manifest(path: Path) -> dict[str, Any]:
    """``manifest.json`` as a dict; ``{}`` when there is none."""
    if not path.is_file():
        return {}
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DlpipeError(f"cannot read {path}: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise DlpipeError(f"{path} is not a manifest of dlpipe convert (format {MANIFEST_FORMAT!r})")
    return manifest


def _match(ctx: Any, pattern: str | Sequence[str]) -> list[str]:
    """The files that ``pattern`` (a glob or a list of them) matches, sorted: relative
    patterns in the working directory, else next to the spec file."""
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    spec_source = getattr(getattr(ctx, "spec", None), "source", None)
    found: set[str] = set()
    for one in patterns:
        hits = glob.glob(one, recursive=True)
        if not hits and not Path(one).is_absolute() and spec_source and Path(spec_source).is_file():
            hits = glob.glob(str(Path(spec_source).parent / one), recursive=True)
        found.update(h for h in hits if Path(h).is_file() and Path(h).name != MANIFEST)
    if not found:
        where = "the working directory" + (" or next to the spec" if spec_source else "")
        raise DlpipeError(f"tfrecord: no files match {', '.join(patterns)} (looked in {where})")
    return sorted(found)


def _layout(params: Any, manifest: dict[str, Any]) -> RecordLayout:
    features = params.features
    if features is not None:
        return RecordLayout(features.image, features.label, features.format, features.dtype,
                            None if features.shape is None else tuple(features.shape))
    if manifest:
        shape = manifest.get("shape")
        return RecordLayout(
            manifest.get("image_key", "image"), manifest.get("label_key", "label"),
            manifest.get("image_format", "encoded"), manifest.get("dtype", "uint8"),
            None if shape is None else (int(shape[0]), int(shape[1]), int(shape[2])),
        )
    return RecordLayout()


def _counts(
    files: list[str], by_name: dict[str, Any], layout: RecordLayout
) -> tuple[dict[str, int], int]:
    """Records per file (the manifest's, else counted) and the largest label counted
    (-1 when none was)."""
    counts = {f: int(by_name[Path(f).name]["count"]) for f in files if Path(f).name in by_name}
    missing = [f for f in files if f not in counts]
    top = -1
    if missing:
        import tensorflow as tf

        print(f"data: tfrecord: {len(missing)} file(s) are not in a {MANIFEST}; counting their "
              "records (one read of each; dlpipe convert writes a manifest)")
        key = layout.label_key

        def label(record: Any) -> Any:
            if key is None:
                return tf.constant(-1, tf.int64)
            return tf.io.parse_single_example(
                record, {key: tf.io.FixedLenFeature([], tf.int64)})[key]

        for f in missing:
            ds = tf.data.TFRecordDataset(f).map(label)
            try:
                count, largest = ds.reduce(
                    (np.int64(0), np.int64(-1)),
                    lambda state, label: (state[0] + 1, tf.maximum(state[1], label)),
                )
            except tf.errors.OpError as exc:
                raise DlpipeError(f"cannot read {f} as TFRecord examples: {exc.message}") from exc
            counts[f] = int(count)
            top = max(top, int(largest))
    return counts, top


def _class_names(
    params: Any, manifest: dict[str, Any], layout: RecordLayout, top_label: int
) -> list[str]:
    if layout.label_key is None:
        return []
    names = params.class_names or manifest.get("class_names")
    if names:
        return [str(n) for n in names]
    if top_label < 0:
        raise DlpipeError("tfrecord: give class_names (the files have no manifest and no labels)")
    return [str(i) for i in range(top_label + 1)]


def _split(
    ctx: Any,
    params: Any,
    matched: dict[str, list[str]],
    files: list[str],
    counts: dict[str, int],
    by_name: dict[str, Any],
) -> dict[str, list[str]]:
    """Files by split: ``splits`` as given, else the manifest's, else cut by fraction."""
    if params.splits:
        parts = {s: matched.get(s, []) for s in SPLITS}
        twice = set(parts["train"]) & (set(parts["val"]) | set(parts["test"]))
        if twice or set(parts["val"]) & set(parts["test"]):
            raise DlpipeError("tfrecord: splits share files; each file belongs to one split")
        return parts
    tagged = {f: by_name.get(Path(f).name, {}).get("split") for f in files}
    if all(tag in SPLITS for tag in tagged.values()):
        parts = {s: [f for f in files if tagged[f] == s] for s in SPLITS}
        if parts["train"]:
            print("data: tfrecord: splits as dlpipe convert wrote them "
                  f"({', '.join(f'{s} {len(v)} files' for s, v in parts.items())})")
            return parts
    seed = params.seed if params.seed is not None else ctx.seed
    return cut_by_file(files, counts, params.val_fraction, params.test_fraction, seed)


def cut_by_file(
    files: list[str], counts: dict[str, int], val_fraction: float, test_fraction: float,
    seed: int,
) -> dict[str, list[str]]:
    """Whole files for each split: a seeded permutation of ``files``, from which test,
    then val, take files until they hold about their fraction of the records (at least
    one file each where the fraction is above 0); train keeps the rest."""
    order = [files[i] for i in np.random.default_rng(seed).permutation(len(files))]
    total = sum(counts[f] for f in files)
    parts: dict[str, list[str]] = {s: [] for s in SPLITS}
    for split, fraction in (("test", test_fraction), ("val", val_fraction)):
        want, taken = fraction * total, 0
        while fraction > 0 and order and (not parts[split] or taken + counts[order[0]] / 2 < want):
            file = order.pop(0)
            parts[split].append(file)
            taken += counts[file]
    parts["train"] = sorted(order)
    parts["val"].sort()
    parts["test"].sort()
    if not parts["train"]:
        raise DlpipeError(
            f"tfrecord: {len(files)} file(s) are too few to cut val and test splits from by "
            "file; write more shards (dlpipe convert --shards), lower the fractions or give "
            "splits"
        )
    sizes = ", ".join(f"{s} {len(v)} files ({sum(counts[f] for f in v)})" for s, v in parts.items())
    print(f"data: tfrecord: split by file with the seed: {sizes}")
    return parts


def _first_image_size(file: str, layout: RecordLayout) -> tuple[int, int]:
    """``(height, width)`` of the first record's image."""
    if layout.stored_shape is not None:
        return layout.stored_shape[0], layout.stored_shape[1]
    import tensorflow as tf

    for record in tf.data.TFRecordDataset(file).take(1):
        spec = {layout.image_key: tf.io.FixedLenFeature([], tf.string)}
        contents = tf.io.parse_single_example(record, spec)[layout.image_key]
        shape = tf.io.decode_image(contents, expand_animations=False).shape
        return int(shape[0]), int(shape[1])
    raise DlpipeError(f"tfrecord: {file} holds no records")
