"""The ``csv`` data stage: a CSV table with a header row.

It splits before it encodes, because it learns its preprocessing (categories, scaling:
:class:`TablePreprocessing`) from the training split; the bundle keeps it so that a
served model can encode raw rows the same way.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from dlpipe import datacheck
from dlpipe.data import DataBundle, array_range, split_indices
from dlpipe.datacheck import is_number
from dlpipe.errors import DlpipeError, close_matches
from dlpipe.stages.data.files import resolve_input
from dlpipe.stages.data.finish import publish


@dataclass
class TablePreprocessing:
    """How the ``csv`` stage turned a table's raw rows into model inputs.

    It is fitted on the training split and applied to every split, and
    :meth:`encode` applies it to new rows, so a served model can take raw rows::

        x = bundle.preprocessing.encode([{"alcohol": "13.2", "color": "red"}])

    Model inputs are the feature ``columns`` in order: a numeric column becomes one
    input, ``(raw - center[col]) / scale[col]``; a categorical column one input per
    category in ``categories[col]`` (1 for the row's category, else 0; an unseen
    category or an empty cell gives all zeros). ``input_names`` names the inputs
    (``"color=red"`` for one-hot inputs). ``mean`` and ``std`` are the numeric
    columns' training-split statistics whatever ``normalize`` is (``standard``:
    ``center`` is the mean and ``scale`` the std; ``minmax``: ``value_range`` spans
    the training minimum to maximum; ``none``: 0 and 1). :meth:`to_dict` and
    :meth:`from_dict` convert to and from JSON-ready data (the stage logs it as the
    artifact ``preprocessing/preprocessing.json``).
    """

    source: str
    label: str
    task: str
    class_names: list[str]
    columns: list[str]
    categories: dict[str, list[str]]
    normalize: str
    center: dict[str, float]
    scale: dict[str, float]
    mean: dict[str, float]
    std: dict[str, float]

    @property
    def numeric(self) -> list[str]:
        return [c for c in self.columns if c not in self.categories]

    @property
    def input_names(self) -> list[str]:
        names: list[str] = []
        for column in self.columns:
            if column in self.categories:
                names.extend(f"{column}={value}" for value in self.categories[column])
            else:
                names.append(column)
        return names

    def encode_columns(self, table: Mapping[str, Any]) -> np.ndarray:
        """Model inputs ``(n, len(input_names))`` float32 from one array per column:
        numbers (or text of numbers; empty text is NaN) for numeric columns, text for
        categorical ones."""
        parts: list[np.ndarray] = []
        for column in self.columns:
            values = np.asarray(table[column])
            if column in self.categories:
                text = values.astype(str)
                one_hot = [text == category for category in self.categories[column]]
                parts.append(np.stack(one_hot, axis=1) if one_hot else np.zeros((len(text), 0)))
            else:
                if values.dtype.kind == "U":
                    values = np.where(values == "", "nan", values)
                scaled = (values.astype(np.float64) - self.center[column]) / self.scale[column]
                parts.append(scaled[:, np.newaxis])
        return np.concatenate(parts, axis=1).astype(np.float32)

    def encode(self, rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """Model inputs for raw rows, each a mapping from column name to value (extra
        keys, the label for one, are ignored)."""
        missing = sorted({c for row in rows for c in self.columns if c not in row})
        if missing:
            raise DlpipeError(f"rows lack the feature column(s) {', '.join(map(repr, missing))} "
                              f"(expected: {', '.join(self.columns)})")
        table = {}
        for c in self.columns:
            values = [_cell(row[c], c in self.categories) for row in rows]
            try:
                table[c] = np.asarray(values, dtype=str if c in self.categories else np.float64)
            except ValueError:
                bad = next(v for v in values if not is_number(v))
                raise DlpipeError(f"column {c!r} holds numbers, not {bad!r}") from None
        return self.encode_columns(table)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "input_names": self.input_names}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TablePreprocessing:
        return cls(**{f.name: data[f.name] for f in fields(cls)})


def _cell(value: Any, categorical: bool) -> Any:
    """A raw row's value as :meth:`TablePreprocessing.encode` reads it."""
    if categorical:
        return "" if value is None else str(value).strip()
    if value is None or (isinstance(value, str) and not value.strip()):
        return np.nan
    return value


@dataclass
class TabularBundle(DataBundle):
    """The ``csv`` stage's bundle: a :class:`DataBundle` of float32 ``(n, inputs)``
    tables plus :attr:`preprocessing`, which encodes raw rows the same way."""

    preprocessing: TablePreprocessing | None = None

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        if self.preprocessing is not None:
            out["columns"] = list(self.preprocessing.columns)
            out["categorical"] = sorted(self.preprocessing.categories)
        return out


def csv_table(ctx: Any, params: Any) -> None:
    """A CSV table with a header row (the ``csv`` stage); see :class:`TablePreprocessing`."""
    path = resolve_input(ctx, params.path, "CSV file")
    header, rows = read_csv(path, params.delimiter)
    if params.limit is not None:
        rows = rows[: params.limit]
    table = np.asarray(rows, dtype=str).reshape(len(rows), len(header))
    label = _column_index(path, header, params.label, "label")
    features = params.features or [c for c in header if c != params.label]
    if not features:
        raise DlpipeError(f"{path}: there are no feature columns: the header has only the "
                          f"label column {params.label!r}")
    for name in (*features, *params.categorical):
        _column_index(path, header, name, "features" if name in features else "categorical")
    categorical = [c for c in features if c in params.categorical]
    numeric = [c for c in features if c not in params.categorical]
    column = {name: table[:, i] for i, name in enumerate(header)}

    # Labels as the checks take them: class indices, or text of numbers for regression.
    y_name = f"label column {params.label!r}"
    class_names: list[str] = []
    if params.task == "classification":
        y, class_names = _class_column(path, y_name, table[:, label])
    else:
        y = _missing_as_nan(table[:, label])
    numbers = _missing_as_nan(np.stack([column[c] for c in numeric], axis=1)
                              if numeric else np.zeros((len(rows), 0), dtype=str))
    try:
        datacheck.check_arrays(path, numbers, y, task=params.task,
                               num_classes=len(class_names) or None, x_name="table",
                               y_name=y_name, columns=numeric)
    except DlpipeError as exc:
        if "table is not numeric" not in str(exc):
            raise
        raise DlpipeError(f"{exc}; or list text columns in categorical to one-hot encode "
                          "them") from None
    if params.task == "regression":
        y = y.astype(np.float32)

    seed = params.seed if params.seed is not None else ctx.seed
    stratify = params.stratify and params.task == "classification"
    parts = split_indices(len(rows), y, params.val_fraction, params.test_fraction, seed,
                          stratify, source=str(path))
    train = parts["train"]
    stats = numbers.astype(np.float64)[train]
    center, scale = _column_scaling(stats, params.normalize, tuple(params.value_range))
    prep = TablePreprocessing(
        source=str(path),
        label=params.label,
        task=params.task,
        class_names=class_names,
        columns=list(features),
        categories={c: sorted({v for v in column[c][train] if v}) for c in categorical},
        normalize=params.normalize,
        center=dict(zip(numeric, center.tolist(), strict=True)),
        scale=dict(zip(numeric, scale.tolist(), strict=True)),
        mean=dict(zip(numeric, stats.mean(axis=0).tolist(), strict=True)),
        std=dict(zip(numeric, stats.std(axis=0).tolist(), strict=True)),
    )
    xs = {s: prep.encode_columns({c: column[c][idx] for c in features})
          for s, idx in parts.items()}
    bundle = TabularBundle(
        x=xs,
        y={s: y[idx] for s, idx in parts.items()},
        task=params.task,
        num_classes=len(class_names) if params.task == "classification" else None,
        class_names=class_names,
        value_range=array_range(xs["train"]),
        name=path.stem,
        preprocessing=prep,
    )
    publish(ctx, bundle)
    if categorical:
        shown = ", ".join(f"{c} ({len(prep.categories[c])})" for c in categorical)
        print(f"data: {path.name}: one-hot encoded {shown}; {len(numeric)} numeric column(s) "
              f"scaled ({params.normalize})")
    run_dir = getattr(ctx, "run_dir", None)
    if run_dir is not None:
        out = Path(run_dir) / "preprocessing" / "preprocessing.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(prep.to_dict(), indent=1, ensure_ascii=False),
                       encoding="utf-8")
        ctx.log_artifact(out, "preprocessing")


def read_csv(path: Path, delimiter: str = ",") -> tuple[list[str], list[list[str]]]:
    """The header and the rows of a CSV file, cells stripped of spaces.

    Blank lines are skipped. A missing or unnamed header, a column name used twice
    and a row with more or fewer fields than the header are errors naming the line.
    """
    line = 0
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter=delimiter, strict=True)
            header = [name.strip() for name in next(reader, [])]
            line = reader.line_num
            if not header:
                raise DlpipeError(f"{path}: the file is empty; expected a header row of "
                                  "column names, then one row per example")
            _check_header(path, header)
            rows: list[list[str]] = []
            for row in reader:
                line = reader.line_num
                if not any(cell.strip() for cell in row):
                    continue
                if len(row) != len(header):
                    raise DlpipeError(
                        f"{path}: line {line} has {len(row)} fields, the header "
                        f"{len(header)}; every row needs one value per column (an empty "
                        f"field for a missing value)"
                    )
                rows.append([cell.strip() for cell in row])
    except UnicodeDecodeError as exc:
        raise DlpipeError(f"cannot read {path} as UTF-8 text: {exc}") from None
    except csv.Error as exc:
        raise DlpipeError(f"cannot read {path} as CSV: line {line + 1}: {exc}") from None
    return header, rows


def _check_header(path: Path, header: list[str]) -> None:
    for i, name in enumerate(header):
        if not name:
            raise DlpipeError(
                f"{path}: column {i + 1} of the header has no name (an index column written "
                "by pandas? write the file with index=False); name every column"
            )
        if name in header[:i]:
            raise DlpipeError(f"{path}: the header names column {name!r} twice (columns "
                              f"{header.index(name) + 1} and {i + 1}); rename one of them")


def _column_index(path: Path, header: list[str], name: str, param: str) -> int:
    if name in header:
        return header.index(name)
    message = f"{path} has no column {name!r} ({param}); its columns: {', '.join(header)}"
    similar = close_matches(name, header)
    if similar:
        message += f"; did you mean: {', '.join(similar)}?"
    raise DlpipeError(message)


def _missing_as_nan(text: np.ndarray) -> np.ndarray:
    """Empty cells as ``"nan"``, so that the data checks count them as missing values."""
    return np.where(text == "", "nan", text)


def _class_column(path: Path, name: str, text: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Class indices and names (sorted; by value when every name is a number)."""
    empty = np.flatnonzero(text == "")
    if len(empty):
        cells = "an empty cell" if len(empty) == 1 else f"{len(empty)} empty cells"
        raise DlpipeError(f"{path}: {name} has {cells} in {len(text)} examples (first: "
                          f"example {empty[0]}); every example needs a class")
    names = sorted({str(v) for v in text})
    try:
        names.sort(key=float)
    except ValueError:
        pass  # class names, not numbers: sorted as text
    if len(names) < 2:
        raise DlpipeError(f"{path}: {name} has a single class ({names[0]!r}); classification "
                          "needs at least 2 (for numeric targets set task: regression)")
    index = {n: i for i, n in enumerate(names)}
    return np.asarray([index[v] for v in text], dtype=np.int32), names


def _column_scaling(
    train: np.ndarray, method: str, target: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Per-column ``(center, scale)`` with ``scaled = (x - center) / scale``, fitted on
    the training rows: the same scaling as :func:`dlpipe.data.normalize` for tables."""
    d = train.shape[1]
    if method == "none" or len(train) == 0:
        return np.zeros(d), np.ones(d)
    if method == "standard":
        std = train.std(axis=0)
        return train.mean(axis=0), np.where(std > 0, std, 1.0)
    if method == "minmax":
        low, high = train.min(axis=0), train.max(axis=0)
        span = np.where(high > low, high - low, 1.0)
        width = target[1] - target[0]
        if width <= 0:
            raise DlpipeError(f"value_range {list(target)} must go from low to high")
        return low - target[0] * span / width, span / width
    raise DlpipeError(f"unknown normalization '{method}' (none, minmax or standard)")
