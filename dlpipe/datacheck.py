"""Checks of loaded data, run by data stages before training starts.

A data file with NaN values, a text column, labels out of range or too few examples
to split should fail at the data stage, with a message that names the file, the array
and the problem, with counts::

    data.npz: array 'x' has 12 NaN values in 3 of 40 examples (first: example 4)

rather than train to nonsense or fail later in NumPy's or scikit-learn's words. Every
check raises :class:`~dlpipe.errors.DlpipeError` (the CLI prints it without a traceback
and exits with status 2).

The checks use NumPy only (importing this module does not import TensorFlow), so data
stages from plugins can call them too:

- :func:`check_arrays`: features, labels and sample weights as a stage loaded them;
- :func:`check_values` and :func:`check_labels`: one array of features or labels;
- :func:`check_split`: enough examples for the train/val/test fractions;
- :func:`stratify_problem`: why a stratified cut is impossible, or ``None``;
- :func:`check_bundle`: a finished :class:`~dlpipe.data.DataBundle`, split by split.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from dlpipe.errors import DlpipeError

if TYPE_CHECKING:
    from dlpipe.data import DataBundle

Source = str | os.PathLike[str]
SplitSizes = Callable[[int, float, float], dict[str, int]]

#: Tasks whose targets are class indices: one per example (classification) or per
#: pixel (segmentation masks).
CLASS_TASKS = ("classification", "segmentation")

_KINDS = {
    "U": "text",
    "S": "bytes",
    "O": "Python objects",
    "c": "complex numbers",
    "M": "dates",
    "m": "time spans",
    "V": "records",
}
_CHUNK = 1 << 22  # values scanned at a time, so big image arrays need little memory


# ------------------------------------------------------------------------ arrays


def check_arrays(
    source: Source,
    x: Any,
    y: Any = None,
    *,
    task: str = "classification",
    num_classes: int | None = None,
    x_name: str = "x",
    y_name: str = "y",
    columns: Sequence[str] | None = None,
    weights: Any = None,
    weights_name: str = "w",
) -> None:
    """Check the features ``x``, targets ``y`` and sample ``weights`` a data stage loaded.

    ``source`` (the file, or the stage's name for generated data) starts every
    message; ``x_name``, ``y_name`` and ``weights_name`` name the arrays in it (such
    as ``"array 'images'"`` for a key of an ``.npz`` file). ``columns`` names the
    columns of a 2-D table (a CSV header), so that messages name a column rather
    than its index. Call it on the arrays as loaded, before converting them to
    float32: the check explains what a conversion would fail on.

    - ``x`` has examples, and ``y`` and ``weights`` one entry per example;
    - ``x`` is numeric (text, objects, dates or complex numbers are not; text that
      reads as numbers, such as ``"1.5"``, is), see :func:`check_values`;
    - ``x`` has no NaN or infinite values;
    - ``y``: numeric and finite; for classification and segmentation whole numbers in
      ``[0, num_classes)`` (see :func:`check_labels`);
    - ``weights``: numeric, finite and not negative.

    Raises :class:`~dlpipe.errors.DlpipeError` with the first problem found.
    """
    where = str(source)
    x = _array(where, x_name, x)
    n = len(x)
    for other, name in ((y, y_name), (weights, weights_name)):
        if other is not None and len(_array(where, name, other)) != n:
            raise DlpipeError(
                f"{where}: {x_name} has {n} examples but {name} has {len(other)}; "
                "they need one entry per example"
            )
    if n == 0:
        raise DlpipeError(f"{where}: {x_name} has no examples")
    check_values(where, x_name, x, columns=columns)
    if y is not None:
        check_labels(where, y_name, y, task=task, num_classes=num_classes)
    if weights is not None:
        w = _numbers(where, weights_name, np.asarray(weights), None, _WEIGHT_HINT)
        _check_finite(where, weights_name, w, None)
        _check_outside(where, weights_name, w, w < 0, "negative value",
                       "sample weights must be 0 or more")


def check_values(
    source: Source, name: str, values: Any, *, columns: Sequence[str] | None = None
) -> None:
    """Check that an array of examples holds numbers and no NaN or infinite values.

    Counts what is wrong: how many values, in how many examples (the first axis), the
    first example affected and, for 2-D tables, the columns (named by ``columns``).
    """
    where = str(source)
    array = _array(where, name, values)
    _check_finite(where, name, _numbers(where, name, array, columns), columns)


def check_labels(
    source: Source,
    name: str,
    labels: Any,
    *,
    task: str = "classification",
    num_classes: int | None = None,
) -> None:
    """Check targets: numbers without NaN or infinite values, and, for classification
    and segmentation, whole numbers in ``[0, num_classes)`` (``num_classes`` None:
    not negative). Classification labels are one per example, shape ``(n,)`` or
    ``(n, 1)``.
    """
    where = str(source)
    y = _array(where, name, labels)
    values = _numbers(where, name, y, None, _LABEL_HINT)
    _check_finite(where, name, values, None)
    if task not in CLASS_TASKS:
        return
    if task == "classification" and not (y.ndim == 1 or (y.ndim == 2 and y.shape[1] == 1)):
        raise DlpipeError(
            f"{where}: {name} has shape {y.shape}; class labels are one integer per "
            f"example, shape ({len(y)},) (one-hot labels: store their argmax)"
        )
    if values.dtype.kind == "f":
        _check_outside(
            where, name, values, values != np.round(values), "non-integer label",
            "class labels are integers 0..num_classes-1 (for real-valued targets set "
            "task: regression)",
        )
    if num_classes is None:
        _check_outside(where, name, values, values < 0, "negative label",
                       "class labels count from 0")
    else:
        _check_outside(
            where, name, values, (values < 0) | (values >= num_classes),
            "label", f"there are {num_classes} classes, labelled 0..{num_classes - 1}",
            qualifier=f" outside [0, {num_classes})",
        )


# ------------------------------------------------------------------------ splits


def split_sizes(n: int, val_fraction: float, test_fraction: float) -> dict[str, int]:
    """How many of ``n`` examples the train, val and test splits get.

    This is how :func:`dlpipe.data.split_indices` cuts (scikit-learn's
    rounding): the test split takes ``ceil(test_fraction * n)`` examples, the val split
    the same share of all examples from what is left (rounded up), train the rest.
    """
    test = math.ceil(test_fraction * n) if test_fraction > 0 else 0
    rest = n - test
    share = val_fraction / (1.0 - test_fraction) if val_fraction > 0 else 0.0
    val = math.ceil(share * rest) if share > 0 and rest > 0 else 0
    return {"train": max(rest - val, 0), "val": val, "test": test}


def check_split(
    source: Source,
    n: int,
    val_fraction: float,
    test_fraction: float,
    *,
    sizes: SplitSizes = split_sizes,
) -> None:
    """Check that ``n`` examples leave at least one for training after the val and
    test splits take their fractions.

    ``sizes(n, val_fraction, test_fraction)`` gives the split sizes (default:
    :func:`split_sizes`); a stage that rounds differently passes its own. The message
    says how many examples each split takes, how many examples these fractions need
    and which fraction to lower.
    """
    parts = sizes(n, val_fraction, test_fraction)
    if parts["train"] >= 1:
        return
    where = str(source)
    if n == 0:
        raise DlpipeError(f"{where}: there are no examples to split")
    needed = n + 1
    while sizes(needed, val_fraction, test_fraction)["train"] < 1 and needed < 100 * n + 10_000:
        needed += 1
    taken = " and ".join(
        f"the {split} split takes {parts[split]}" for split in ("test", "val") if parts[split]
    )
    fractions = sorted(
        ((value, key) for value, key in ((test_fraction, "test_fraction"),
                                         (val_fraction, "val_fraction")) if value > 0),
        reverse=True,
    )
    lower = " or ".join(key for _, key in fractions)
    are = "is" if n == 1 else "are"
    raise DlpipeError(
        f"{where}: {_count(n, 'example')} {are} too few to split into train/val/test with "
        f"val_fraction {val_fraction:g} and test_fraction {test_fraction:g}: {taken}, "
        f"leaving none for training. These fractions need at least {needed} examples; "
        f"use more data, or lower {lower} (0 turns a split off)"
    )


def stratify_problem(labels: Any, fraction: float) -> str | None:
    """Why a stratified cut of ``fraction`` of these examples is impossible, or ``None``.

    The same conditions as scikit-learn's stratified split, in dlpipe's words: every
    class needs at least 2 examples, and each side of the cut at least one example of
    every class.
    """
    y = np.asarray(labels)
    classes, counts = np.unique(y, return_counts=True)
    lonely = classes[counts < 2]
    if len(lonely):
        which = ", ".join(_show(c) for c in lonely[:10]) + (", ..." if len(lonely) > 10 else "")
        has = f"class {which} has" if len(lonely) == 1 else f"classes {which} have"
        return f"{has} only 1 example (stratifying needs at least 2 of each class)"
    n, k = len(y), len(classes)
    taken = math.ceil(fraction * n)
    for size, verb in ((taken, "get"), (n - taken, "leave")):
        if size < k:
            return (
                f"the cut would {verb} {size} of {n} examples for {k} classes "
                "(stratifying needs at least one example of each class on each side)"
            )
    return None


# ------------------------------------------------------------------------ bundles


def check_bundle(bundle: DataBundle, source: Source | None = None) -> None:
    """Check a finished :class:`~dlpipe.data.DataBundle` split by split.

    The training split must have examples; the val and test splits may be empty (a
    fraction of 0). Every non-empty split gets :func:`check_arrays` (with the
    bundle's task and ``num_classes``), and its examples must have the training
    split's shape. Messages start with ``source`` (default: the bundle's name) and
    name the split: ``"train x has 3 NaN values in 1 of 28 examples"``.
    """
    where = str(source) if source is not None else bundle.name
    sizes = {split: bundle.size(split) for split in bundle.x}
    if sizes.get("train", 0) == 0:
        shown = ", ".join(f"{split} {size}" for split, size in sizes.items()) or "no splits"
        raise DlpipeError(f"{where}: the train split is empty ({shown})")
    shape = np.shape(bundle.x["train"])[1:]
    for split, x in bundle.x.items():
        y, w = bundle.y.get(split), bundle.weights.get(split)
        if sizes[split] == 0:
            _check_empty(where, split, y, w)
            continue
        if np.shape(x)[1:] != shape:
            raise DlpipeError(
                f"{where}: {split} x has examples of shape {tuple(np.shape(x)[1:])}, "
                f"but train x has {tuple(shape)}"
            )
        check_arrays(
            where, x, y, task=bundle.task, num_classes=bundle.num_classes,
            x_name=f"{split} x", y_name=f"{split} y",
            weights=w, weights_name=f"{split} weights",
        )


# ------------------------------------------------------------------------ helpers


def _check_empty(where: str, split: str, y: Any, w: Any) -> None:
    for other, name in ((y, "y"), (w, "weights")):
        if other is not None and len(other):
            raise DlpipeError(
                f"{where}: {split} x has no examples but {split} {name} has {len(other)}"
            )


def _array(where: str, name: str, values: Any) -> np.ndarray:
    """``values`` as an array with a first (example) axis."""
    try:
        array = np.asarray(values)
    except ValueError as exc:  # ragged nested lists
        raise DlpipeError(f"{where}: {name} is not an array of equally shaped examples: "
                          f"{exc}") from exc
    if array.ndim == 0:
        raise DlpipeError(
            f"{where}: {name} is a single value ({_show(array)}), not an array of examples"
        )
    return array


_FEATURE_HINT = (
    "features must be numbers (encode categories as numbers, or leave those columns out)"
)
_LABEL_HINT = "labels must be numbers (map class names to 0..num_classes-1)"
_WEIGHT_HINT = "sample weights must be numbers"


def _numbers(
    where: str,
    name: str,
    array: np.ndarray,
    columns: Sequence[str] | None,
    hint: str = _FEATURE_HINT,
) -> np.ndarray:
    """``array`` itself if numeric, text that reads as numbers as float64, else raise."""
    kind = array.dtype.kind
    if kind in "biuf":
        return array
    if kind in "USO":
        try:
            return array.astype(np.float64)
        except (TypeError, ValueError):
            bad = ~np.vectorize(is_number, otypes=[bool])(array)
    else:
        bad = np.ones(array.shape, dtype=bool)
    first = np.unravel_index(int(np.argmax(bad)), array.shape)
    described = f"dtype {array.dtype}, {_KINDS.get(kind, 'not numbers')}"
    where_cols = ""
    if array.ndim == 2 and array.shape[1] > 1:
        where_cols = f" in {_columns(np.flatnonzero(bad.any(axis=0)), columns)}"
    count = int(bad.sum())
    are = "is not a number" if count == 1 else "are not numbers"
    raise DlpipeError(
        f"{where}: {name} is not numeric ({described}): {count} of {array.size} values "
        f"{are}{where_cols}, e.g. {_show(array[first])} in "
        f"{_position(first, array, columns)}; {hint}"
    )


def is_number(value: Any) -> bool:
    """Whether ``float(value)`` works (numbers, and text that reads as one)."""
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def _check_finite(where: str, name: str, values: np.ndarray, columns: Sequence[str] | None) -> None:
    """Count NaN and infinite values (and the examples they are in); raise if any."""
    if values.dtype.kind != "f" or len(values) == 0:
        return
    n = len(values)
    rows = values.reshape(n, -1)
    step = max(1, _CHUNK // max(1, rows.shape[1]))
    nan_values = inf_values = nan_rows = inf_rows = 0
    first: int | None = None
    bad_columns = np.zeros(rows.shape[1], dtype=bool)
    for start in range(0, n, step):
        part = rows[start : start + step]
        finite = np.isfinite(part)
        if finite.all():
            continue
        nan = np.isnan(part)
        inf = ~finite & ~nan
        nan_values += int(nan.sum())
        inf_values += int(inf.sum())
        nan_rows += int(nan.any(axis=1).sum())
        inf_rows += int(inf.any(axis=1).sum())
        if first is None:
            first = start + int(np.argmin(finite.all(axis=1)))
        bad_columns |= ~finite.all(axis=0)
    if first is None:
        return
    found = []
    if nan_values:
        found.append(f"{_count(nan_values, 'NaN value')} in {nan_rows} of {n} examples")
    if inf_values:
        found.append(f"{_count(inf_values, 'infinite value')} in {inf_rows} of {n} examples")
    detail = f"first: example {first}"
    if values.ndim == 2 and values.shape[1] > 1:
        detail += f"; {_columns(np.flatnonzero(bad_columns), columns)}"
    raise DlpipeError(
        f"{where}: {name} has {' and '.join(found)} ({detail}); "
        "drop or fill them before training"
    )


def _check_outside(
    where: str,
    name: str,
    values: np.ndarray,
    bad: np.ndarray,
    what: str,
    hint: str,
    *,
    qualifier: str = "",
) -> None:
    """Raise when ``bad`` marks any value: how many ``what`` (a noun, made plural), in
    how many examples, and the first one."""
    if not bad.any():
        return
    n = len(values)
    first = np.unravel_index(int(np.argmax(bad)), bad.shape)
    examples = int(bad.reshape(n, -1).any(axis=1).sum())
    found = _count(int(bad.sum()), what) + qualifier
    raise DlpipeError(
        f"{where}: {name} has {found} in {examples} of {n} examples, "
        f"e.g. {_show(values[first])} in example {first[0]}; {hint}"
    )


def _columns(indices: np.ndarray, names: Sequence[str] | None) -> str:
    shown = [f"'{names[i]}'" if names is not None and i < len(names) else str(i)
             for i in indices[:8]]
    more = f" and {len(indices) - 8} more" if len(indices) > 8 else ""
    return f"column{'s' if len(indices) > 1 else ''} {', '.join(shown)}{more}"


def _position(index: tuple[Any, ...], array: np.ndarray, columns: Sequence[str] | None) -> str:
    text = f"example {int(index[0])}"
    if array.ndim == 2 and array.shape[1] > 1:
        text += f", {_columns(np.asarray([int(index[1])]), columns)}"
    return text


def _show(value: Any) -> str:
    """A value as a message shows it: ``'red'``, ``7``, ``0.5``, ``nan``."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return f"{value:g}"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _count(n: int, noun: str) -> str:
    """``"1 label"``, ``"3 labels"``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
