"""Data that stays on disk: the stream sources of the image data stages and what turns
them into a :class:`~dlpipe.data.StreamingBundle`.

- :class:`FileListSource`: image files, read and decoded inside ``tf.data``. It reads
  by index, so an epoch's order is the permutation of ``(seed, epoch)`` that the
  in-memory form uses: the same batches, example for example.
- :class:`TFRecordSource`: TFRecord shards (``dlpipe convert`` writes them). Files are
  read in a per-epoch order of ``(seed, epoch)``, interleaved, then shuffled in
  windows keyed on ``(seed, epoch)``; workers take whole files.
- :class:`GeneratorSource`: a Python generator function, shuffled in windows.
- :func:`publish_stream`: normalization statistics (given in the spec, or from a
  bounded pass over the training split), the bundle, ``ctx.data``.

TensorFlow is imported where it is used.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dlpipe.data import (
    StreamingBundle,
    StreamSource,
    split_indices,
    stream_preprocessing,
    stream_statistics,
)
from dlpipe.errors import DlpipeError
from dlpipe.stages.data.finish import given_statistics, publish

#: ``[R, G, B]`` weights of PIL's integer grayscale conversion (``L = (R*19595 +
#: G*38470 + B*7471 + 0x8000) >> 16``), so streamed grayscale images equal in-memory ones.
PIL_LUMA = (19595, 38470, 7471)


def decode_image(contents: Any, shape: tuple[int, int, int]) -> Any:
    """Encoded image bytes (PNG, JPEG, BMP; a GIF's first frame) as float32 pixels of
    ``shape``, as the in-memory ``image_directory`` reads them with PIL: RGB, or PIL's
    grayscale; resized (bilinear, antialiased) only when the size differs."""
    import tensorflow as tf

    image = tf.io.decode_image(contents, channels=3, expand_animations=False)
    if shape[2] == 1:
        rgb = tf.cast(image, tf.int32)
        r, g, b = PIL_LUMA
        luma = (rgb[..., 0] * r + rgb[..., 1] * g + rgb[..., 2] * b + 0x8000) // 65536
        image = luma[..., tf.newaxis]
    return resize_to(tf.cast(image, tf.float32), shape)


def resize_to(image: Any, shape: tuple[int, int, int]) -> Any:
    """A float32 ``(h, w, c)`` image at ``shape``: resized as ``resize_images`` does
    when its size differs, left as it is otherwise."""
    import tensorflow as tf

    height, width, channels = shape
    same = tf.reduce_all(tf.equal(tf.shape(image)[:2], [height, width]))
    image = tf.cond(
        same,
        lambda: image,
        lambda: tf.image.resize(image, (height, width), method="bilinear", antialias=True),
    )
    return tf.ensure_shape(image, (height, width, channels))


def image_size_of(path: str | Path) -> tuple[int, int]:
    """``(height, width)`` of an image file, from its header."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            width, height = img.size
    except OSError as exc:
        raise DlpipeError(f"cannot read image {path}: {exc}") from exc
    return int(height), int(width)


def _image_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    height, width, channels = (int(d) for d in shape)
    return height, width, channels


def _epoch_shuffle(ds: Any, order: Any, buffer: int) -> Any:
    """``ds`` shuffled in consecutive windows of ``buffer`` elements, each permuted by
    ``stateless_shuffle`` keyed on the ``[seed, epoch]`` tensor ``order`` and the
    window's number. (``Dataset.shuffle`` cannot take a tensor seed under every global
    seed, and stateless keys keep epochs independent of each other.)"""
    if order is None or buffer <= 1:
        return ds
    import tensorflow as tf

    def permute(window: Any, elements: Any) -> Any:
        key = tf.stack([order[0] * 1_000_003 + order[1], window])
        first = tf.nest.flatten(elements)[0]
        index = tf.random.experimental.stateless_shuffle(tf.range(tf.shape(first)[0]), seed=key)
        return tf.data.Dataset.from_tensor_slices(
            tf.nest.map_structure(lambda t: tf.gather(t, index), elements))

    # The next window fills while this one is read, so the stream does not stall.
    return ds.batch(buffer).prefetch(1).enumerate().flat_map(permute)


class FileListSource(StreamSource):
    """Image files with their labels, decoded with :func:`decode_image` as they are read.

    ``read(order)`` permutes the example indices with ``stateless_shuffle`` keyed on
    ``order``, as :meth:`DataBundle.epoch_dataset` permutes arrays, so both forms
    give the same batches for the same seed.
    """

    def __init__(
        self, paths: Sequence[str], labels: np.ndarray | None, shape: tuple[int, int, int]
    ) -> None:
        self.paths = [str(p) for p in paths]
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int32)
        self.size = len(self.paths)
        self.image_shape = _image_shape(shape)
        self.shape = self.image_shape
        self.labelled = self.labels is not None
        self._tensors: tuple[Any, Any] | None = None

    def _paths_and_labels(self) -> tuple[Any, Any]:
        import tensorflow as tf

        # Made eagerly once (also when first asked for inside a tf.data function) and
        # captured by reference, not copied into every epoch's graph.
        with tf.init_scope():
            if self._tensors is None:
                paths = tf.constant(self.paths, dtype=tf.string)
                labels = None if self.labels is None else tf.constant(self.labels, tf.int32)
                self._tensors = (paths, labels)
        return self._tensors

    def read(self, order: Any = None) -> Any:
        import tensorflow as tf

        paths, labels = self._paths_and_labels()
        shape = self.image_shape
        index = tf.range(self.size, dtype=tf.int64)
        if order is not None:
            index = tf.random.experimental.stateless_shuffle(index, seed=order)

        def load(i: Any) -> Any:
            image = decode_image(tf.io.read_file(tf.gather(paths, i)), shape)
            return image if labels is None else (image, tf.gather(labels, i))

        return tf.data.Dataset.from_tensor_slices(index).map(
            load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
        )

    def subset(self, index: Sequence[int] | np.ndarray) -> FileListSource:
        index = np.asarray(index, dtype=np.int64)
        labels = None if self.labels is None else self.labels[index]
        return FileListSource([self.paths[i] for i in index], labels, self.image_shape)

    def sample(self, count: int, seed: int) -> Any:
        """``count`` files drawn with ``seed`` (not the first ones, which are one class)."""
        chosen = np.random.default_rng(seed).permutation(self.size)[:count]
        return self.subset(np.sort(chosen)).read()

    def shard(self, count: int, index: int) -> FileListSource:
        return self.subset(np.arange(index, self.size, count))


@dataclass(frozen=True)
class RecordLayout:
    """How images and labels are stored in TFRecord ``tf.train.Example`` records.

    ``image_format``: ``encoded`` (PNG/JPEG/... bytes, decoded with
    :func:`decode_image`) or ``raw`` (pixels as bytes of ``dtype`` in
    ``stored_shape``, row-major). ``label_key`` None: unlabelled.
    """

    image_key: str = "image"
    label_key: str | None = "label"
    image_format: str = "encoded"
    dtype: str = "uint8"
    stored_shape: tuple[int, int, int] | None = None

    def parse(self, records: Any, shape: tuple[int, int, int]) -> Any:
        """A batch of serialized records as ``(images, labels)`` (``images`` when
        unlabelled): raw pixels decoded for the whole batch at once, encoded images one
        by one."""
        import tensorflow as tf

        spec = {self.image_key: tf.io.FixedLenFeature([], tf.string)}
        if self.label_key is not None:
            spec[self.label_key] = tf.io.FixedLenFeature([], tf.int64)
        example = tf.io.parse_example(records, spec)
        if self.image_format == "raw":
            if self.stored_shape is None:
                raise DlpipeError("raw TFRecord images need their stored shape")
            pixels = tf.io.decode_raw(example[self.image_key], tf.dtypes.as_dtype(self.dtype))
            images = tf.cast(tf.reshape(pixels, (-1, *self.stored_shape)), tf.float32)
            if tuple(self.stored_shape[:2]) != tuple(shape[:2]):
                images = tf.image.resize(images, shape[:2], method="bilinear", antialias=True)
        else:
            images = tf.map_fn(lambda c: decode_image(c, shape), example[self.image_key],
                               fn_output_signature=tf.TensorSpec(shape, tf.float32))
        if self.label_key is None:
            return images
        return images, tf.cast(example[self.label_key], tf.int32)


class TFRecordSource(StreamSource):
    """Images in TFRecord files: ``counts`` gives each file's number of records.

    ``read(order)`` reads the files in an order drawn from ``order``, up to eight at a
    time interleaved 16 records at a time, and permutes each window of
    ``shuffle_buffer`` serialized records with a key drawn from ``order`` (memory: the
    window times the record size). Shards are whole files.
    """

    def __init__(
        self,
        files: Sequence[str],
        counts: Sequence[int],
        layout: RecordLayout,
        shape: tuple[int, int, int],
        shuffle_buffer: int = 2048,
    ) -> None:
        self.files = [str(f) for f in files]
        self.counts = [int(c) for c in counts]
        self.layout = layout
        self.image_shape = _image_shape(shape)
        self.shape = self.image_shape
        self.shuffle_buffer = int(shuffle_buffer)
        self.size = sum(self.counts)
        self.labelled = layout.label_key is not None

    def read(self, order: Any = None) -> Any:
        import tensorflow as tf

        files = tf.constant(self.files, dtype=tf.string)
        if order is not None:
            files = tf.gather(files, tf.random.experimental.stateless_shuffle(
                tf.range(len(self.files), dtype=tf.int64), seed=order))
        ds = tf.data.Dataset.from_tensor_slices(files).interleave(
            tf.data.TFRecordDataset, cycle_length=max(1, min(len(self.files), 8)),
            block_length=16, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True,
        )
        ds = _epoch_shuffle(ds, order, min(self.shuffle_buffer, max(self.size, 1)))
        layout, shape = self.layout, self.image_shape
        # Parsed 64 records at a time (vectorized), handed on one by one.
        return ds.batch(64).map(lambda records: layout.parse(records, shape),
                                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).unbatch()

    def shard(self, count: int, index: int) -> TFRecordSource:
        if len(self.files) < count:
            raise DlpipeError(
                f"{len(self.files)} TFRecord file(s) cannot be shared by {count} workers "
                "(each takes whole files); write more shards with dlpipe convert --shards"
            )
        return TFRecordSource(self.files[index::count], self.counts[index::count],
                              self.layout, self.image_shape, self.shuffle_buffer)


class GeneratorSource(StreamSource):
    """Examples from ``make()``, a generator function called once per pass that yields
    ``(x, y)`` (``x`` float32 of ``shape``, ``y`` an integer) or ``x`` alone.

    Epochs permute each window of ``shuffle_buffer`` examples with a key drawn from
    the epoch's order. A shard keeps every ``count``-th example, so each worker still
    runs the whole generator.
    """

    def __init__(
        self,
        make: Callable[[], Iterator[Any]],
        size: int,
        shape: tuple[int, ...],
        *,
        labelled: bool = True,
        shuffle_buffer: int = 1024,
        part: tuple[int, int] = (1, 0),
    ) -> None:
        self.make = make
        self.shape = tuple(int(d) for d in shape)
        self.labelled = labelled
        self.shuffle_buffer = int(shuffle_buffer)
        self.part = part
        self.size = len(range(part[1], int(size), part[0]))
        self._total = int(size)

    def read(self, order: Any = None) -> Any:
        import tensorflow as tf

        x_spec = tf.TensorSpec(self.shape, tf.float32)
        signature: Any = (x_spec, tf.TensorSpec((), tf.int32)) if self.labelled else x_spec
        ds = tf.data.Dataset.from_generator(self.make, output_signature=signature)
        count, index = self.part
        if count > 1:
            ds = ds.shard(count, index)
        return _epoch_shuffle(ds, order, min(self.shuffle_buffer, max(self.size, 1)))

    def shard(self, count: int, index: int) -> GeneratorSource:
        if self.part != (1, 0):
            raise DlpipeError("a generator source is sharded once")
        return GeneratorSource(self.make, self._total, self.shape, labelled=self.labelled,
                               shuffle_buffer=self.shuffle_buffer, part=(count, index))


# --------------------------------------------------------------------------------------
# From sources to ctx.data
# --------------------------------------------------------------------------------------

#: The statistics each normalization needs; the value range needs low and high.
NEEDED_STATISTICS = {
    "minmax": ("low", "high"),
    "standard": ("low", "high", "mean", "std"),
    "none": ("low", "high"),
}


def training_statistics(
    train: StreamSource, method: str, given: Mapping[str, float], count: int, seed: int,
    name: str,
) -> dict[str, float]:
    """``given``, completed where ``method`` needs more by one bounded pass over at most
    ``count`` training examples (drawn with ``seed`` where the source can)."""
    if all(k in given for k in NEEDED_STATISTICS.get(method, ())):
        return dict(given)
    count = min(count, train.size)

    def features(*example: Any) -> Any:
        return example[0]

    batches = train.sample(count, seed).map(features).batch(64).as_numpy_iterator()
    measured = stream_statistics(batches)
    print(f"data: {name}: normalization statistics from {count} of {train.size} training "
          "examples (stats_sample)")
    return {**measured, **given}


def publish_stream(
    ctx: Any,
    params: Any,
    name: str,
    sources: dict[str, StreamSource],
    class_names: list[str],
    *,
    image_size: tuple[int, int] | None,
) -> StreamingBundle:
    """Normalization statistics, the :class:`StreamingBundle` of ``sources``, ``ctx.data``.

    ``params`` carries ``normalize``, ``value_range``, ``stats_sample``, ``mean``,
    ``std``, ``input_range``, ``max_report_examples`` and ``seed``. The task is
    classification where the sources have labels, unsupervised otherwise.
    """
    seed = params.seed if params.seed is not None else ctx.seed
    method = params.normalize
    stats = training_statistics(sources["train"], method, given_statistics(params),
                                params.stats_sample, seed, name)
    preprocessing, value_range = stream_preprocessing(
        method, tuple(params.value_range), stats, image_size
    )
    labelled = sources["train"].labelled
    bundle = StreamingBundle(
        task="classification" if labelled else "unsupervised",
        num_classes=len(class_names) if labelled else None,
        class_names=class_names if labelled else [],
        value_range=value_range,
        name=name,
        sources=sources,
        preprocessing=preprocessing,
        max_report_examples=params.max_report_examples,
    )
    publish(ctx, bundle)
    return bundle


def stream_image_files(
    ctx: Any, params: Any, root: Path, files_by_class: Mapping[str, list[Path]]
) -> StreamingBundle:
    """``image_directory`` streamed: the file list is split as the in-memory form splits
    the decoded images (the same seeded, stratified cut of the same labels), and each
    split reads its files when a dataset asks for them."""
    paths = [str(f) for files in files_by_class.values() for f in files]
    labels = np.asarray(
        [label for label, files in enumerate(files_by_class.values()) for _ in files],
        dtype=np.int32,
    )
    if params.limit is not None:
        paths, labels = paths[: params.limit], labels[: params.limit]
    channels = 1 if params.color_mode == "grayscale" else 3
    size = tuple(params.image_size) if params.image_size is not None else image_size_of(paths[0])
    shape = (int(size[0]), int(size[1]), channels)
    seed = params.seed if params.seed is not None else ctx.seed
    parts = split_indices(len(paths), labels, params.val_fraction, params.test_fraction, seed,
                          params.stratify, source=str(root))
    everything = FileListSource(paths, labels, shape)
    sources: dict[str, StreamSource] = {s: everything.subset(idx) for s, idx in parts.items()}
    return publish_stream(ctx, params, root.name, sources, list(files_by_class),
                          image_size=(shape[0], shape[1]))
