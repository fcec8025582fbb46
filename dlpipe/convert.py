"""``dlpipe convert``: images as sharded TFRecord files, for the ``tfrecord`` data stage.

The input is a folder of class sub-folders of images (what ``image_directory`` reads)
or an ``.npz`` of images. Examples are shuffled with the seed before they are cut into
shards, so every shard mixes the classes and whole shards make fair splits. The output
folder gets ``<split>-NNNNN-of-MMMMM.tfrecord`` shards and, last, ``manifest.json``
(the record layout, class names, each shard's split and record count), which the
``tfrecord`` stage reads; a folder without it is an unfinished conversion.

Two record formats: ``encoded`` keeps each image file's bytes as they are (smallest,
nothing decoded here; the stage decodes and resizes while training), ``raw`` stores
decoded pixels (``--image-size`` resizes them here; 8-bit images stay 8-bit, rounded
after resizing), which is fastest to read. TensorFlow is imported when converting.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from dlpipe.errors import DlpipeError

#: At least this many shards by default, so val/test fractions of 0.1 can be cut by file.
MIN_SHARDS = 10
#: Default shard size target.
SHARD_BYTES = 128 * 2**20
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")


class _Examples:
    """What is converted: ``count`` examples, their ``labels`` (or None), ``class_names``;
    ``encoded(i)`` gives an image file's bytes, ``pixels(i)`` decoded pixels."""

    count: int
    labels: np.ndarray | None
    class_names: list[str]
    size_bytes: int

    def encoded(self, i: int) -> bytes:
        raise DlpipeError("an .npz holds pixels, not image files: use --format raw")

    def pixels(self, i: int) -> np.ndarray:
        raise NotImplementedError


class _Folder(_Examples):
    def __init__(self, root: Path, color_mode: str) -> None:
        from dlpipe.stages.data.files import class_folders

        def images(folder: Path) -> list[Path]:
            return sorted(p for p in folder.iterdir()
                          if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)

        by_class, _ = class_folders(root, images)
        if not by_class:
            raise DlpipeError(f"no images in class sub-folders of {root} "
                              f"(expected {root}/<class>/<image>.png)")
        self.paths = [p for files in by_class.values() for p in files]
        self.labels = np.asarray(
            [k for k, files in enumerate(by_class.values()) for _ in files], dtype=np.int64
        )
        self.class_names = list(by_class)
        self.count = len(self.paths)
        self.size_bytes = sum(p.stat().st_size for p in self.paths)
        self.mode = "L" if color_mode == "grayscale" else "RGB"

    def encoded(self, i: int) -> bytes:
        return self.paths[i].read_bytes()

    def pixels(self, i: int) -> np.ndarray:
        from PIL import Image

        try:
            with Image.open(self.paths[i]) as img:
                array = np.asarray(img.convert(self.mode), dtype=np.uint8)
        except OSError as exc:
            raise DlpipeError(f"cannot read image {self.paths[i]}: {exc}") from exc
        return array[..., np.newaxis] if array.ndim == 2 else array


class _Arrays(_Examples):
    def __init__(self, path: Path, x_key: str, y_key: str) -> None:
        from dlpipe import datacheck

        try:
            with np.load(path, allow_pickle=False) as archive:
                arrays = {key: archive[key] for key in archive.files}
        except Exception as exc:  # a broken zip, a pickled array, not an npz at all
            raise DlpipeError(f"could not read {path} as a .npz file: {exc}") from exc
        if x_key not in arrays:
            raise DlpipeError(f"{path} has no array {x_key!r} (--x-key); it has "
                              f"{', '.join(sorted(arrays)) or 'none'}")
        x = arrays[x_key]
        y = arrays.get(y_key)
        if y is None and y_key != "y":
            raise DlpipeError(f"{path} has no array {y_key!r} (--y-key); it has "
                              f"{', '.join(sorted(arrays))}")
        datacheck.check_arrays(path, x, y, x_name=f"array '{x_key}'", y_name=f"array '{y_key}'")
        if x.ndim == 3:
            x = x[..., np.newaxis]
        if x.ndim != 4:
            raise DlpipeError(f"{path}: array {x_key!r} has shape {x.shape}; convert writes "
                              "images, (n, height, width) or (n, height, width, channels)")
        self.x = x if x.dtype == np.uint8 else x.astype(np.float32)
        self.labels = None if y is None else np.ravel(y).astype(np.int64)
        top = -1 if self.labels is None or not len(self.labels) else int(self.labels.max())
        self.class_names = [str(k) for k in range(top + 1)]
        self.count = len(x)
        self.size_bytes = int(self.x.nbytes)
        if y is None:
            print(f"convert: {path} has no array 'y'; writing images without labels")

    def pixels(self, i: int) -> np.ndarray:
        return np.asarray(self.x[i])


def _resized(pixels: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """``pixels`` resized as the data stages resize (bilinear, antialiased); 8-bit stays
    8-bit (rounded)."""
    if size is None or tuple(pixels.shape[:2]) == tuple(size):
        return pixels
    import tensorflow as tf

    out = tf.image.resize(pixels.astype(np.float32), size, method="bilinear",
                          antialias=True).numpy()
    if pixels.dtype == np.uint8:
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return out.astype(np.float32)


class _Progress:
    """A progress line at most every ``every`` seconds (checked per example and shard)."""

    def __init__(self, total: int, shards: int, write: Callable[[str], None],
                 every: float = 2.0) -> None:
        self.total, self.shards, self.write, self.every = total, shards, write, every
        self.done = self.shards_done = self.bytes = 0
        self.start = self.last = time.perf_counter()

    def step(self, size: int) -> None:
        self.done += 1
        self.bytes += size
        if time.perf_counter() - self.last >= self.every:
            self.show()

    def shard_done(self) -> None:
        self.shards_done += 1
        if time.perf_counter() - self.last >= self.every:
            self.show()

    def show(self) -> None:
        self.last = time.perf_counter()
        rate = self.done / max(self.last - self.start, 1e-9)
        self.write(f"convert: {self.done:,}/{self.total:,} examples "
                   f"({100 * self.done / max(self.total, 1):.0f}%), {self.shards_done}/"
                   f"{self.shards} shards, {self.bytes / 2**20:,.1f} MB, {rate:,.0f} examples/s")


def convert(
    source: str | Path,
    output: str | Path,
    *,
    shards: int | None = None,
    image_format: str | None = None,
    image_size: tuple[int, int] | None = None,
    color_mode: str = "rgb",
    val_fraction: float = 0.0,
    test_fraction: float = 0.0,
    seed: int = 0,
    x_key: str = "x",
    y_key: str = "y",
    write: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write ``source`` (an image folder or an ``.npz``) to ``output`` as TFRecord shards
    and a manifest; returns the manifest.

    ``shards``: how many (default: shards of about 128 MB, at least :data:`MIN_SHARDS`,
    at most one per example). ``val_fraction``/``test_fraction`` above 0 write the
    splits as separate shards (the seeded, stratified cut of the data stages); the
    ``tfrecord`` stage then uses them. ``write`` receives the progress lines.
    """
    from dlpipe.data import split_indices
    from dlpipe.stages.data.tfrecord import MANIFEST, MANIFEST_FORMAT

    def say(line: str) -> None:
        (write or (lambda s: print(s, flush=True)))(line)

    source, output = Path(source), Path(output)
    if shards is not None and shards < 1:
        raise DlpipeError(f"convert: --shards {shards}: expected at least 1")
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DlpipeError("convert: the val and test fractions must be in [0, 1) and sum below 1")
    if source.is_dir():
        examples: _Examples = _Folder(source, color_mode)
    elif source.is_file():
        examples = _Arrays(source, x_key, y_key)
    else:
        raise DlpipeError(f"convert: {source} is neither an image folder nor an .npz file")
    fmt = image_format or ("encoded" if isinstance(examples, _Folder) and image_size is None
                           else "raw")
    if fmt == "encoded" and image_size is not None:
        raise DlpipeError("convert: --image-size resizes decoded pixels: use --format raw "
                          "(encoded keeps the files' bytes; the tfrecord stage resizes them)")
    if output.exists() and (any(output.glob("*.tfrecord")) or (output / MANIFEST).exists()):
        raise DlpipeError(f"convert: {output} already holds TFRecord files or a {MANIFEST}; "
                          "convert into a new or empty folder")
    output.mkdir(parents=True, exist_ok=True)

    n = examples.count
    if val_fraction > 0 or test_fraction > 0:
        parts = split_indices(n, examples.labels, val_fraction, test_fraction, seed,
                              examples.labels is not None, source=str(source))
        parts = {s: idx for s, idx in parts.items() if len(idx)}
    else:
        parts = {"data": np.arange(n)}
    rng = np.random.default_rng(seed)
    parts = {s: rng.permutation(idx) for s, idx in parts.items()}
    total = shards or max(MIN_SHARDS, math.ceil(examples.size_bytes / SHARD_BYTES))
    per_part = {s: max(1, min(len(idx), round(total * len(idx) / n))) for s, idx in parts.items()}

    import tensorflow as tf

    def feature(example: int, image: bytes) -> bytes:
        values = {"image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image]))}
        if examples.labels is not None:
            label = int(examples.labels[example])
            values["label"] = tf.train.Feature(int64_list=tf.train.Int64List(value=[label]))
        return tf.train.Example(
            features=tf.train.Features(feature=values)).SerializeToString()

    shape: tuple[int, ...] | None = None
    dtype = "uint8"
    progress = _Progress(n, sum(per_part.values()), say)
    written = []
    for split, idx in parts.items():
        count = per_part[split]
        for k, chunk in enumerate(np.array_split(idx, count)):
            name = f"{split}-{k:05d}-of-{count:05d}.tfrecord"
            with tf.io.TFRecordWriter(str(output / name)) as writer:
                for i in chunk:
                    if fmt == "encoded":
                        payload = examples.encoded(int(i))
                    else:
                        pixels = _resized(examples.pixels(int(i)), image_size)
                        if shape is None:
                            shape, dtype = tuple(pixels.shape), str(pixels.dtype)
                        elif tuple(pixels.shape) != shape:
                            raise DlpipeError(
                                f"convert: example {int(i)} has shape {pixels.shape}, the first "
                                f"had {shape}; give --image-size to store one size")
                        payload = np.ascontiguousarray(pixels).tobytes()
                    record = feature(int(i), payload)
                    writer.write(record)
                    progress.step(len(record))
            written.append({"file": name, "split": None if split == "data" else split,
                            "count": len(chunk)})
            progress.shard_done()

    manifest = {
        "format": MANIFEST_FORMAT,
        "version": 1,
        "source": str(source.resolve()),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "image_key": "image",
        "label_key": "label" if examples.labels is not None else None,
        "image_format": fmt,
        "dtype": dtype if fmt == "raw" else None,
        "shape": list(shape) if shape is not None else None,
        "color_mode": color_mode,
        "class_names": examples.class_names,
        "seed": seed,
        "examples": n,
        "shards": written,
    }
    path = output / MANIFEST
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(temporary, path)
    say(f"convert: wrote {n:,} examples in {len(written)} shards "
        f"({progress.bytes / 2**20:,.1f} MB, {fmt}) to {output}; manifest {path}")
    return manifest
