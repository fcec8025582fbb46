"""The data bundle that data stages produce and later stages consume, and the array
operations every data source shares: the seeded train/val/test split
(:func:`split_indices`), normalization fitted on the training split (:func:`normalize`)
and image resizing (:func:`resize_images`).

Data larger than memory is a :class:`StreamingBundle`: the same interface, with each
split read from a :class:`StreamSource` (files decoded inside ``tf.data``) every epoch.

NumPy at import; scikit-learn and TensorFlow are imported where they are used.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dlpipe.datacheck import check_split, stratify_problem
from dlpipe.errors import DlpipeError

SPLITS = ("train", "val", "test")

Splits = dict[str, np.ndarray]


@dataclass
class DataBundle:
    """Arrays for each split plus what models need to know about them.

    ``x[split]`` are float32 features (images are ``(n, height, width, channels)``),
    ``y[split]`` integer labels or targets (or ``None``), and the optional
    ``weights[split]`` float32 per-example loss weights. :meth:`dataset` turns a split
    into a batched ``tf.data`` pipeline; augmentation layers added by augment stages
    run inside it, on the training split only.
    """

    x: dict[str, np.ndarray]
    y: dict[str, np.ndarray | None]
    task: str = "classification"  # classification | regression | unsupervised
    num_classes: int | None = None
    class_names: list[str] = field(default_factory=list)
    value_range: tuple[float, float] = (0.0, 1.0)
    name: str = "data"
    augmenters: list[Any] = field(default_factory=list)
    #: Per-example loss weights by split (``(n,)`` float32), or none.
    weights: dict[str, np.ndarray | None] = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.x["train"].shape[1:])

    @property
    def is_image(self) -> bool:
        return len(self.input_shape) == 3

    def size(self, split: str) -> int:
        return 0 if split not in self.x else int(len(self.x[split]))

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            **{f"{s}_size": self.size(s) for s in SPLITS},
        }

    def dataset(
        self,
        split: str,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        augment: bool = False,
        drop_remainder: bool = False,
    ) -> Any:
        """A cached, batched, prefetched ``tf.data.Dataset`` of :meth:`examples`:
        ``(x, y)`` pairs, ``(x, y, w)`` triples when the split has sample weights, or
        ``x`` alone when it has no targets. Keras weights each example's loss by ``w``."""
        import tensorflow as tf

        examples = self.examples(split)
        ds = tf.data.Dataset.from_tensor_slices(examples).cache()
        n = self.size(split)
        if shuffle and n:
            ds = ds.shuffle(n, seed=seed, reshuffle_each_iteration=True)
        ds = ds.batch(batch_size, drop_remainder=drop_remainder)
        return self._finish_pipeline(ds, augment)

    def epoch_dataset(
        self,
        split: str,
        batch_size: int,
        *,
        first_epoch: int = 0,
        epochs: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        augment: bool = False,
    ) -> Any:
        """The batches of epochs ``first_epoch .. epochs - 1`` back to back, for
        ``fit(steps_per_epoch=ceil(n / batch_size))``.

        Each epoch's order is a permutation drawn from ``(seed, epoch)`` alone
        (``stateless_shuffle``), not from a generator that advances as epochs go by,
        so a run resumed at epoch ``k`` sees exactly the batches an uninterrupted run
        sees from epoch ``k`` on.
        """
        import tensorflow as tf

        n = self.size(split)
        arrays = tf.nest.map_structure(tf.convert_to_tensor, self.examples(split))

        def one_epoch(epoch: Any) -> Any:
            order = tf.range(n, dtype=tf.int64)
            if shuffle:
                key = tf.stack([tf.constant(seed, tf.int64), epoch])
                order = tf.random.experimental.stateless_shuffle(order, seed=key)
            batches = tf.data.Dataset.from_tensor_slices(order).batch(batch_size)
            return batches.map(lambda idx: tf.nest.map_structure(
                lambda a: tf.gather(a, idx), arrays))

        ds = tf.data.Dataset.range(first_epoch, max(epochs, first_epoch)).flat_map(one_epoch)
        return self._finish_pipeline(ds, augment)

    def examples(self, split: str) -> Any:
        """A split as ``fit`` takes it, one entry per example: ``x``, ``(x, y)`` or
        ``(x, y, w)``. Bundles with other model inputs (dicts of arrays) override it
        and, if they hold images elsewhere, :meth:`augment_batch`."""
        x = self.x[split]
        y = self.y.get(split)
        w = self.weights.get(split)
        if y is None:
            return x
        if w is None:
            return (x, y)
        return (x, y, np.asarray(w, dtype=np.float32))

    def augment_batch(self, batch: tuple[Any, ...]) -> tuple[Any, ...]:
        """Run the augment stages' layers on a batch's images (its first element)."""
        images = batch[0]
        for layer in self.augmenters:
            images = layer(images, training=True)
        return (images, *batch[1:])

    def _finish_pipeline(self, ds: Any, augment: bool) -> Any:
        import tensorflow as tf

        if augment and self.augmenters:

            def apply(*batch: Any) -> Any:
                out = self.augment_batch(batch)
                return out if len(out) > 1 else out[0]

            ds = ds.map(apply, num_parallel_calls=tf.data.AUTOTUNE)
        return ds.prefetch(tf.data.AUTOTUNE)


def split_indices(
    n: int,
    y: np.ndarray | None,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    stratify: bool,
    *,
    source: str = "data",
) -> dict[str, np.ndarray]:
    """The example indices of each split: a seeded cut (stratified by ``y`` when
    ``stratify``); a fraction of 0 gives an empty split.

    Fails with a :class:`DlpipeError` (starting with ``source``) when the fractions
    leave no training examples. Where a stratified cut is impossible (a class with a
    single example, fewer examples than classes) it says so and cuts without.
    """
    check_split(source, n, val_fraction, test_fraction)
    index = np.arange(n)
    labels = y if stratify else None

    def cut(
        idx: np.ndarray, fraction: float, salt: int, split: str
    ) -> tuple[np.ndarray, np.ndarray]:
        if fraction <= 0:
            return idx, idx[:0]
        part = None if labels is None else labels[idx]
        if part is not None and (problem := stratify_problem(part, fraction)):
            print(f"data: {source}: cannot stratify the {split} split: {problem}; "
                  "splitting it without stratification")
            part = None
        return _train_test_split(idx, fraction, seed + salt, part)

    rest, test = cut(index, test_fraction, 0, "test")
    # val_fraction is a share of all examples, not of what the test split left.
    val_share = val_fraction / (1.0 - test_fraction) if val_fraction > 0 else 0.0
    train, val = cut(rest, val_share, 1, "val")
    return {"train": train, "val": val, "test": test}


def _train_test_split(
    idx: np.ndarray, fraction: float, seed: int, labels: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    # check_split and stratify_problem have ruled out scikit-learn's ValueErrors.
    kept, taken = train_test_split(idx, test_size=fraction, random_state=seed, stratify=labels)
    return np.sort(kept), np.sort(taken)


def normalize(
    xs: Splits,
    method: str,
    target: tuple[float, float],
    *,
    image: bool,
    given: Mapping[str, float] | None = None,
) -> tuple[Splits, tuple[float, float]]:
    """Scale every split with statistics of the training split only.

    Images use one global statistic; tables one per feature (column). ``given``
    statistics from the spec (``low``/``high`` for minmax, ``mean``/``std`` for
    standard) replace the fitted ones. Returns the scaled splits and the value range
    of the scaled training data.
    """
    train = xs["train"].astype(np.float32)
    axis = None if image else 0
    given = given or {}
    if method == "minmax":
        low: Any
        high: Any
        if "low" in given and "high" in given:
            low, high = np.float32(given["low"]), np.float32(given["high"])
        else:
            low, high = np.min(train, axis=axis), np.max(train, axis=axis)
        span = np.where(high > low, high - low, 1.0)
        scale = (target[1] - target[0]) / span
        out = {s: (v - low) * scale + target[0] for s, v in xs.items()}
        value_range = (float(target[0]), float(target[1]))
    elif method == "standard":
        mean: Any
        std: Any
        if "mean" in given and "std" in given:
            mean, std = np.float32(given["mean"]), np.float32(given["std"])
        else:
            mean, std = np.mean(train, axis=axis), np.std(train, axis=axis)
        std = np.where(std > 0, std, 1.0)
        out = {s: (v - mean) / std for s, v in xs.items()}
        value_range = array_range(out["train"])
    elif method == "none":
        out = dict(xs)
        value_range = array_range(train)
    else:
        raise DlpipeError(f"unknown normalization '{method}' (none, minmax or standard)")
    return {s: np.asarray(v, dtype=np.float32) for s, v in out.items()}, value_range


def resize_images(x: np.ndarray, size: tuple[int, int], batch: int = 1024) -> np.ndarray:
    """Resize ``(n, h, w, c)`` images to ``size`` (bilinear with antialiasing)."""
    import tensorflow as tf

    height, width = (int(v) for v in size)
    if x.shape[1:3] == (height, width):
        return x.astype(np.float32)
    if len(x) == 0:
        return np.zeros((0, height, width, x.shape[3]), dtype=np.float32)
    chunks = [
        tf.image.resize(x[i : i + batch], (height, width), method="bilinear", antialias=True)
        for i in range(0, len(x), batch)
    ]
    return np.concatenate([c.numpy() for c in chunks]).astype(np.float32)


def array_range(x: np.ndarray) -> tuple[float, float]:
    """The smallest and largest value of ``x``; ``(0, 1)`` when it is empty."""
    return (float(np.min(x)), float(np.max(x))) if x.size else (0.0, 1.0)


# --------------------------------------------------------------------------------------
# Data larger than memory
# --------------------------------------------------------------------------------------


class StreamSource:
    """One split's examples, read from outside memory inside ``tf.data``.

    A subclass sets :attr:`size` (the number of examples, known without reading
    them), :attr:`shape` (one example's features) and :attr:`labelled`, and
    implements :meth:`read` and :meth:`shard`. ``dlpipe.stages.data.streaming`` has
    the built-in sources: image files, TFRecord shards and a Python generator.
    """

    size: int = 0
    shape: tuple[int, ...] = ()
    labelled: bool = True

    def read(self, order: Any = None) -> Any:
        """The examples as an unbatched ``tf.data.Dataset`` of ``(x, y)``, or ``x``
        alone when unlabelled; ``x`` is float32 as decoded, before normalization.

        ``order`` None reads them in the source's own order, the same every time. An
        int64 ``[seed, epoch]`` tensor reads them in that epoch's order, which depends
        on nothing else (so a resumed run sees the batches an uninterrupted one sees).
        """
        raise NotImplementedError

    def sample(self, count: int, seed: int) -> Any:
        """At most ``count`` examples for normalization statistics (default: the first)."""
        return self.read().take(count)

    def shard(self, count: int, index: int) -> StreamSource:
        """Part ``index`` of ``count`` disjoint parts, one per worker."""
        raise NotImplementedError


@dataclass
class StreamingBundle(DataBundle):
    """A :class:`DataBundle` whose splits stay on disk: each is a :class:`StreamSource`
    that :meth:`dataset` and :meth:`epoch_dataset` decode batch by batch, so memory
    does not grow with the data. Training, augmentation and metrics work as on the
    in-memory form.

    ``x[split]`` and ``y[split]`` (what reports, figures and sample grids read) hold
    the first ``max_report_examples`` examples of a split, decoded when first asked
    for; a notice says so where the split has more. ``preprocessing`` is the
    normalization applied to each batch, as a
    ``dlpipe.packaging.preprocessing.Preprocessing`` dict (packaging reads it).
    """

    x: Any = None
    y: Any = None
    sources: dict[str, StreamSource] = field(default_factory=dict)
    preprocessing: dict[str, Any] = field(default_factory=dict)
    max_report_examples: int = 1000
    #: ``(count, index)`` once :meth:`shard` has cut the bundle.
    sharded: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        for given in (self.x, self.y):
            if given is not None and not isinstance(given, _ReportView):
                raise DlpipeError(
                    f"{self.name}: the splits of streamed data cannot be replaced by arrays; "
                    "oversample, class_weight and the tune stage's refit on train+val need "
                    "the data in memory (set stream: false in the data stage)"
                )
        self.x = _ReportView(self, 0)
        self.y = _ReportView(self, 1)
        self._heads: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.sources["train"].shape)

    def size(self, split: str) -> int:
        source = self.sources.get(split)
        return 0 if source is None else int(source.size)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "streamed": True}

    def examples(self, split: str) -> Any:
        raise DlpipeError(
            f"{self.name}: streamed data has no in-memory examples; read a split with "
            "dataset() or epoch_dataset()"
        )

    def dataset(
        self,
        split: str,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        augment: bool = False,
        drop_remainder: bool = False,
    ) -> Any:
        """The split decoded batch by batch, normalized, augmented when asked, prefetched.
        ``shuffle`` draws a new order each time the dataset is iterated."""
        import tensorflow as tf

        source = self.sources[split]
        if shuffle:
            draws = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).take(1)
            ds = draws.flat_map(
                lambda r: source.read(tf.stack([tf.constant(seed, tf.int64), r]))
            )
        else:
            ds = source.read()
        return self._finish_pipeline(ds.batch(batch_size, drop_remainder=drop_remainder), augment)

    def epoch_dataset(
        self,
        split: str,
        batch_size: int,
        *,
        first_epoch: int = 0,
        epochs: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        augment: bool = False,
    ) -> Any:
        """As :meth:`DataBundle.epoch_dataset`: each epoch's order comes from
        ``(seed, epoch)`` alone, through :meth:`StreamSource.read`."""
        import tensorflow as tf

        source = self.sources[split]

        def one_epoch(epoch: Any) -> Any:
            order = tf.stack([tf.constant(seed, tf.int64), epoch]) if shuffle else None
            return source.read(order).batch(batch_size)

        ds = tf.data.Dataset.range(first_epoch, max(epochs, first_epoch)).flat_map(one_epoch)
        return self._finish_pipeline(ds, augment)

    def shard(self, count: int, index: int) -> StreamingBundle:
        """The bundle with every split cut to part ``index`` of ``count`` disjoint parts
        (whole files where the source has several), for one worker of ``count``.
        Its datasets turn ``tf.data`` auto-sharding off: they are sharded already."""
        if not 0 <= index < count:
            raise DlpipeError(f"shard {index} of {count}: expected 0 <= index < count")
        return dataclasses.replace(
            self, x=None, y=None, sharded=(count, index),
            sources={s: src.shard(count, index) for s, src in self.sources.items()},
        )

    def normalize(self, x: Any) -> Any:
        """Raw values to model inputs: :func:`normalize`'s formulas with the statistics in
        ``preprocessing``."""
        prep = self.preprocessing
        method = prep.get("method", "none")
        if method == "minmax":
            low, high = np.float32(prep["low"]), np.float32(prep["high"])
            t0, t1 = (np.float32(v) for v in prep["target"])
            scale = (t1 - t0) / (high - low if high > low else np.float32(1.0))
            return (x - low) * scale + t0
        if method == "standard":
            std = np.float32(prep["std"]) if prep["std"] > 0 else np.float32(1.0)
            return (x - np.float32(prep["mean"])) / std
        return x

    def report_examples(self, split: str) -> tuple[np.ndarray, np.ndarray | None]:
        """The first ``max_report_examples`` examples of ``split``, normalized, as arrays
        (what ``x[split]`` and ``y[split]`` hold); read once."""
        if split not in self._heads:
            source = self.sources[split]
            count = min(source.size, self.max_report_examples)
            if count < source.size:
                print(f"data: {self.name}: reports and figures use the first {count} of "
                      f"{source.size} {split} examples (max_report_examples); metrics use all")
            xs: list[np.ndarray] = []
            ys: list[np.ndarray] = []
            for batch in source.read().take(count).batch(256).as_numpy_iterator():
                x, y = batch if source.labelled else (batch, None)
                xs.append(np.asarray(self.normalize(x), dtype=np.float32))
                if y is not None:
                    ys.append(y)
            x_head = np.concatenate(xs) if xs else np.zeros((0, *source.shape), np.float32)
            y_head = None
            if source.labelled:
                y_head = np.concatenate(ys) if ys else np.zeros((0,), np.int32)
            self._heads[split] = (x_head, y_head)
        return self._heads[split]

    def _finish_pipeline(self, ds: Any, augment: bool) -> Any:
        import tensorflow as tf

        def normalize(*batch: Any) -> Any:
            x = self.normalize(batch[0])
            return (x, *batch[1:]) if len(batch) > 1 else x

        ds = super()._finish_pipeline(ds.map(normalize, num_parallel_calls=tf.data.AUTOTUNE),
                                      augment)
        if self.sharded is not None:
            options = tf.data.Options()
            options.experimental_distribute.auto_shard_policy = (
                tf.data.experimental.AutoShardPolicy.OFF
            )
            ds = ds.with_options(options)
        return ds


class _ReportView(Mapping[str, Any]):
    """``x`` (part 0) or ``y`` (part 1) of a :class:`StreamingBundle`: each split's
    first examples, read when first asked for. Membership does not read anything."""

    def __init__(self, bundle: StreamingBundle, part: int) -> None:
        self._bundle = bundle
        self._part = part

    def __getitem__(self, split: str) -> Any:
        source = self._bundle.sources.get(split)
        if source is None:
            raise KeyError(split)
        if self._part == 1 and not source.labelled:
            return None
        return self._bundle.report_examples(split)[self._part]

    def __contains__(self, split: object) -> bool:
        return split in self._bundle.sources

    def __iter__(self) -> Iterator[str]:
        return iter(self._bundle.sources)

    def __len__(self) -> int:
        return len(self._bundle.sources)


def stream_statistics(batches: Any) -> dict[str, float]:
    """``low``, ``high``, ``mean``, ``std`` and ``count`` of every value in ``batches``
    (arrays), accumulated in float64: the statistics of a bounded pass."""
    count, total, squares = 0, 0.0, 0.0
    low, high = math.inf, -math.inf
    for batch in batches:
        values = np.asarray(batch, dtype=np.float64)
        if values.size == 0:
            continue
        count += values.size
        total += float(values.sum())
        squares += float(np.square(values).sum())
        low, high = min(low, float(values.min())), max(high, float(values.max()))
    if count == 0:
        return {"count": 0, "low": 0.0, "high": 1.0, "mean": 0.0, "std": 1.0}
    mean = total / count
    std = math.sqrt(max(squares / count - mean * mean, 0.0))
    return {"count": count, "low": low, "high": high, "mean": mean, "std": std}


def stream_preprocessing(
    method: str,
    target: tuple[float, float],
    stats: Mapping[str, float],
    image_size: tuple[int, int] | None = None,
) -> tuple[dict[str, Any], tuple[float, float]]:
    """The normalization of streamed data (a ``Preprocessing`` dict, see
    :attr:`StreamingBundle.preprocessing`) and the value range it gives, from
    statistics of the training split (given in the spec, or of a bounded pass):
    ``low``/``high`` for minmax, ``mean``/``std`` for standard."""
    low, high = float(stats["low"]), float(stats["high"])
    prep: dict[str, Any] = {
        "method": method, "target": [float(v) for v in target], "low": None, "high": None,
        "mean": None, "std": None, "image_size": list(image_size) if image_size else None,
    }
    if method == "minmax":
        prep.update(low=low, high=high)
        value_range = (float(target[0]), float(target[1]))
    elif method == "standard":
        mean = float(stats["mean"])
        std = float(stats["std"]) if stats["std"] > 0 else 1.0
        prep.update(mean=mean, std=std)
        value_range = ((low - mean) / std, (high - mean) / std)
    elif method == "none":
        value_range = (low, high)
    else:
        raise DlpipeError(f"unknown normalization '{method}' (none, minmax or standard)")
    return prep, value_range
