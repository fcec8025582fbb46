"""The data bundle that data stages produce and later stages consume, and the array
operations every data source shares: the seeded train/val/test split
(:func:`split_indices`), normalization fitted on the training split (:func:`normalize`)
and image resizing (:func:`resize_images`).

NumPy at import; scikit-learn and TensorFlow are imported where they are used.
"""

from __future__ import annotations

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
    xs: Splits, method: str, target: tuple[float, float], *, image: bool
) -> tuple[Splits, tuple[float, float]]:
    """Scale every split with statistics of the training split only.

    Images use one global statistic; tables one per feature (column). Returns the
    scaled splits and the value range of the scaled training data.
    """
    train = xs["train"].astype(np.float32)
    axis = None if image else 0
    if method == "minmax":
        low, high = np.min(train, axis=axis), np.max(train, axis=axis)
        span = np.where(high > low, high - low, 1.0)
        scale = (target[1] - target[0]) / span
        out = {s: (v - low) * scale + target[0] for s, v in xs.items()}
        value_range = (float(target[0]), float(target[1]))
    elif method == "standard":
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
