"""Data stages: load arrays, split them with a seed, resize and normalize images.

Every array stage here ends in :func:`_finish`, which applies the options shared by all
data stages (``limit``, ``image_size``, the seeded train/val/test split and the
normalization fitted on the training split) and sets ``ctx.data``. Before the split it
checks the arrays (:mod:`dlpipe.datacheck`: numbers, no NaN or infinite values, labels
in range, enough examples for the fractions); stages that read files check what they
read as well, before converting it.

The ``csv`` stage (:func:`csv_table`) splits before it encodes, because it learns its
preprocessing (categories, scaling: :class:`TablePreprocessing`) from the training
split; ``text_directory`` splits texts and tokenizes them with
:mod:`dlpipe.datasets.sequences`.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from dlpipe.data import SPLITS, DataBundle
from dlpipe.datacheck import check_arrays, check_split, is_number, stratify_problem
from dlpipe.errors import DlpipeError, close_matches

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")

FASHION_MNIST_CLASSES = [
    "t-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
]
CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
]

Splits = dict[str, np.ndarray]


# --------------------------------------------------------------------------- stages


def sklearn_digits(ctx: Any, params: Any) -> None:
    """scikit-learn's bundled 8x8 digits as ``(n, 8, 8, 1)`` images with values 0..16."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = digits.images.astype(np.float32)[..., np.newaxis]
    y = digits.target.astype(np.int32)
    _finish(ctx, params, "sklearn_digits", x, y, "classification", [str(i) for i in range(10)])


def sklearn_iris(ctx: Any, params: Any) -> None:
    """scikit-learn's bundled iris table: ``(150, 4)`` features, 3 classes."""
    from sklearn.datasets import load_iris

    iris = load_iris()
    x = iris.data.astype(np.float32)
    y = iris.target.astype(np.int32)
    _finish(ctx, params, "sklearn_iris", x, y, "classification", [str(n) for n in iris.target_names])


def npz(ctx: Any, params: Any) -> None:
    """Arrays from a local ``.npz`` file (path relative to the working directory)."""
    path = Path(params.path)
    if not path.is_file():
        raise DlpipeError(_missing_file_message(path))
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except Exception as exc:  # a broken zip, a pickled array, not an npz at all
        raise DlpipeError(f"could not read {path} as a .npz file: {exc}") from exc

    task = params.task
    x = _npz_array(path, arrays, params.x_key, "x_key")
    y: np.ndarray | None = None
    if task != "unsupervised":
        if params.y_key is None:
            raise DlpipeError(
                f"{path}: task '{task}' needs labels, but y_key is null; "
                "name the label array with y_key or set task: unsupervised"
            )
        y = _npz_array(path, arrays, params.y_key, "y_key")
    w = None
    if params.weight_key is not None:
        w = _npz_array(path, arrays, params.weight_key, "weight_key")
    # Check the arrays as stored, so that text or NaN values are explained, not converted.
    check_arrays(
        path, x, y, task=task,
        x_name=f"array '{params.x_key}'", y_name=f"array '{params.y_key}'",
        weights=w, weights_name=f"array '{params.weight_key}'",
    )

    x = _features(path, x)
    class_names: list[str] = []
    if y is not None:
        if task == "classification":
            y = _class_labels(y)
            class_names = [str(i) for i in range(int(y.max()) + 1)]
        else:
            y = y.astype(np.float32)
    weights = None if w is None else _sample_weights(path, w, len(x))
    _finish(ctx, params, path.stem, x, y, task, class_names, weights=weights, source=str(path))


def class_folders(
    root: Path, list_files: Callable[[Path], list[Path]]
) -> tuple[dict[str, list[Path]], list[str]]:
    """``{class: files}`` for the sub-folders of ``root`` that hold files (sorted by
    name; hidden folders skipped), and the names of those that hold none."""
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    found = {d.name: list_files(d) for d in class_dirs}
    empty = [name for name, files in found.items() if not files]
    return {name: files for name, files in found.items() if files}, empty


def image_directory(ctx: Any, params: Any) -> None:
    """A folder with one sub-folder of images per class (``path/<class>/<image>.png``)."""
    root = Path(params.path)
    layout = f"expected one sub-folder of images per class: {root}/<class>/<image>.png"
    if not root.is_dir():
        raise DlpipeError(f"image folder not found: {root} ({_cwd_note(root)}); {layout}")

    files_by_class, empty = class_folders(root, _image_files)
    if not files_by_class:
        loose = len(_image_files(root))
        hint = f" (found {loose} image(s) directly in {root}, but none in class sub-folders)" if loose else ""
        raise DlpipeError(f"no images found in {root}{hint}; {layout}")
    if empty:
        print(f"data: image_directory ignores empty class folder(s): {', '.join(empty)}")

    mode = "L" if params.color_mode == "grayscale" else "RGB"
    images: list[np.ndarray] = []
    labels: list[int] = []
    for label, files in enumerate(files_by_class.values()):
        for file in files:
            images.append(_load_image(file, mode))
            labels.append(label)
    if params.image_size is not None:
        images = _resize_each(images, params.image_size)
    shapes = sorted({img.shape for img in images})
    if len(shapes) > 1:
        raise DlpipeError(
            f"images in {root} have different sizes ({', '.join(map(str, shapes[:4]))}); "
            "set image_size to resize them"
        )
    x = np.stack(images).astype(np.float32)
    y = np.asarray(labels, dtype=np.int32)
    # Images are already at image_size; don't resize them a second time.
    _finish(ctx, params, root.name, x, y, "classification", list(files_by_class), resize=False,
            source=str(root))


def keras_dataset(ctx: Any, params: Any) -> None:
    """mnist, fashion_mnist or cifar10 from ``keras.datasets``.

    The official train and test parts are joined (train first) and split again
    with this stage's fractions and seed, like every other data stage.
    """
    import keras

    name = params.dataset
    try:
        loader = getattr(keras.datasets, name).load_data
        (x_train, y_train), (x_test, y_test) = loader()
    except Exception as exc:  # offline: URL fetch failure, a partial download, ...
        raise DlpipeError(
            f"keras_dataset could not load '{name}': {exc}\n"
            f"keras.datasets downloads '{name}' once (this needs network access) into the "
            "Keras cache ~/.keras/datasets (or $KERAS_HOME/datasets) and reads it from there "
            "afterwards. Run once with network access, or work offline with the "
            "sklearn_digits or npz data stages."
        ) from exc

    x = np.concatenate([x_train, x_test]).astype(np.float32)
    if x.ndim == 3:
        x = x[..., np.newaxis]
    y = np.concatenate([np.ravel(y_train), np.ravel(y_test)]).astype(np.int32)
    names = {"fashion_mnist": FASHION_MNIST_CLASSES, "cifar10": CIFAR10_CLASSES}
    class_names = names.get(name, [str(i) for i in range(10)])
    _finish(ctx, params, name, x, y, "classification", list(class_names))


XOR_CORNERS = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float32)


def xor(ctx: Any, params: Any) -> None:
    """The XOR problem: label 1 when exactly one of two inputs is "on".

    ``corners``: the four points (0,0), (0,1), (1,0), (1,1), each repeated ``repeats``
    times, with optional Gaussian ``noise``. ``cloud``: ``4 * repeats`` points drawn
    uniformly from [-1, 1]^2 and labelled by the signs of the two coordinates (noise
    again blurs the inputs, after labelling). No line separates the two classes, so a
    network without a hidden layer cannot fit it and one hidden layer can.
    """
    seed = params.seed if params.seed is not None else ctx.seed
    rng = np.random.default_rng(seed)
    n = 4 * params.repeats
    if params.layout == "corners":
        x = np.tile(XOR_CORNERS, (params.repeats, 1))
        y = (x[:, 0] != x[:, 1]).astype(np.int32)
    else:
        x = rng.uniform(-1.0, 1.0, size=(n, 2)).astype(np.float32)
        y = ((x[:, 0] > 0) != (x[:, 1] > 0)).astype(np.int32)
    if params.noise > 0:
        x = x + rng.normal(0.0, params.noise, size=x.shape).astype(np.float32)
    order = rng.permutation(n)
    _finish(ctx, params, "xor", x[order], y[order], "classification", ["0", "1"])


# ------------------------------------------------------------------ CSV tables


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
        check_arrays(path, numbers, y, task=params.task,
                     num_classes=len(class_names) or None, x_name="table", y_name=y_name,
                     columns=numeric)
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
        value_range=_range(xs["train"]),
        name=path.stem,
        preprocessing=prep,
    )
    _publish(ctx, bundle)
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
    the training rows: the same scaling as :func:`normalize` for tables."""
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


# ------------------------------------------------------------------ text folders


TEXT_SUFFIX = ".txt"


def text_directory(ctx: Any, params: Any) -> None:
    """A folder with one sub-folder of ``.txt`` files per class (``path/<class>/<name>.txt``).

    Each file is one example: whitespace runs become single spaces, optionally lower
    case and cut to ``max_chars``. The texts are split with the seed like every data
    stage and tokenized per character (a ``tokenize`` stage may re-tokenize them); the
    result is a :class:`~dlpipe.datasets.sequences.TextClassBundle`.
    """
    from dlpipe.datasets.sequences import publish_text_classes, text_class_bundle

    root = resolve_input(ctx, params.path, "text folder")
    layout = f"expected one sub-folder of .txt files per class: {root}/<class>/<name>.txt"
    if not root.is_dir():
        raise DlpipeError(f"{root} is not a folder; {layout}")
    files_by_class, empty = class_folders(root, _text_files)
    if not files_by_class:
        loose = len(_text_files(root))
        hint = ""
        if loose:
            hint = f" (found {loose} .txt file(s) directly in {root}, but none in class sub-folders)"
        raise DlpipeError(f"no .txt files found in {root}{hint}; {layout}")
    if empty:
        print(f"data: text_directory ignores empty class folder(s): {', '.join(empty)}")
    if len(files_by_class) < 2:
        raise DlpipeError(f"{root}: only one class folder has .txt files "
                          f"({next(iter(files_by_class))}); classification needs at least 2")

    texts: list[str] = []
    labels: list[int] = []
    blank: list[str] = []
    for label, files in enumerate(files_by_class.values()):
        for file in files:
            text = _read_text(file, params.encoding, params.lowercase, params.max_chars)
            if not text:
                blank.append(str(file.relative_to(root)))
                continue
            texts.append(text)
            labels.append(label)
    if blank:
        shown = ", ".join(blank[:3]) + (", ..." if len(blank) > 3 else "")
        print(f"data: text_directory ignores {len(blank)} empty file(s): {shown}")
    y = np.asarray(labels, dtype=np.int32)
    seed = params.seed if params.seed is not None else ctx.seed
    parts = split_indices(len(texts), y, params.val_fraction, params.test_fraction, seed,
                          params.stratify, source=str(root))
    split = {s: ([texts[i] for i in idx], [int(y[i]) for i in idx]) for s, idx in parts.items()}
    bundle = text_class_bundle(root.name, split, list(files_by_class))
    publish_text_classes(ctx, bundle)


def _text_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() == TEXT_SUFFIX)


def _read_text(file: Path, encoding: str, lowercase: bool, max_chars: int | None) -> str:
    try:
        text = file.read_text(encoding=encoding)
    except UnicodeDecodeError as exc:
        raise DlpipeError(f"cannot read {file} as {encoding} text: {exc}; set encoding "
                          "to the files' encoding") from None
    except LookupError:
        raise DlpipeError(f"unknown text encoding {encoding!r} (e.g. utf-8, latin-1)") from None
    text = " ".join(text.split())
    text = text.lower() if lowercase else text
    return text[:max_chars].rstrip() if max_chars is not None else text


# ------------------------------------------------------------------ input files


def resolve_input(ctx: Any, path: str, what: str) -> Path:
    """A data file or folder named in a spec: relative paths are looked up in the
    working directory, then in the spec file's folder. Raises when neither has it,
    naming both places and close matches."""
    given = Path(path)
    tried = [given]
    spec_source = getattr(getattr(ctx, "spec", None), "source", None)
    if not given.is_absolute() and spec_source and Path(spec_source).is_file():
        tried.append((Path(spec_source).parent / given).resolve())
    for candidate in tried:
        if candidate.exists():
            return candidate
    places = " or ".join(str(p.resolve()) for p in tried)
    message = f"{what} not found: {path} (looked for {places})"
    folder = tried[-1].parent
    if folder.is_dir():
        names = [p.name for p in folder.iterdir()]
        similar = close_matches(given.name, names)
        if similar:
            message += f"; did you mean: {', '.join(str(given.parent / s) for s in similar)}?"
    raise DlpipeError(message)


# ------------------------------------------------------------------ shared helpers


def _finish(
    ctx: Any,
    params: Any,
    name: str,
    x: np.ndarray,
    y: np.ndarray | None,
    task: str,
    class_names: list[str],
    *,
    resize: bool = True,
    weights: np.ndarray | None = None,
    source: str | None = None,
) -> DataBundle:
    """Limit, check, resize, split, normalize; set ``ctx.data`` and report the result.

    ``weights`` (optional per-example loss weights) are split with the examples.
    ``source`` (default: ``name``) starts the messages of the data checks: the file
    or folder the stage read.
    """
    source = source or name
    if params.limit is not None:
        x = x[: params.limit]
        y = None if y is None else y[: params.limit]
        weights = None if weights is None else weights[: params.limit]
    check_arrays(source, x, y, task=task, num_classes=len(class_names) or None, weights=weights)
    image = x.ndim == 4
    size = getattr(params, "image_size", None)
    if size is not None and resize:
        if not image:
            raise DlpipeError(
                f"{name}: image_size is set, but the data is not images (shape {x.shape[1:]})"
            )
        x = resize_images(x, size)

    seed = params.seed if params.seed is not None else ctx.seed
    stratify = params.stratify and task == "classification" and y is not None
    parts = split_indices(
        len(x), y, params.val_fraction, params.test_fraction, seed, stratify, source=source
    )
    xs = {s: x[idx] for s, idx in parts.items()}
    ys = {s: None if y is None else y[idx] for s, idx in parts.items()}
    ws = {s: None if weights is None else weights[idx] for s, idx in parts.items()}
    xs, value_range = normalize(xs, params.normalize, tuple(params.value_range), image=image)

    num_classes = len(class_names) if task == "classification" else None
    bundle = DataBundle(
        x=xs,
        y=ys,
        task=task,
        num_classes=num_classes,
        class_names=class_names,
        value_range=value_range,
        name=name,
        weights=ws if weights is not None else {},
    )
    return _publish(ctx, bundle)


def _publish(ctx: Any, bundle: DataBundle) -> DataBundle:
    """Set ``ctx.data`` and print what the stage produced."""
    ctx.data = bundle
    ctx.extras["data"] = bundle.describe()
    sizes = "/".join(str(bundle.size(s)) for s in SPLITS)
    what = f"{bundle.num_classes} classes" if bundle.task == "classification" else bundle.task
    print(f"data: {bundle.name} {sizes} train/val/test, shape {bundle.input_shape}, {what}")
    return bundle


def split_arrays(
    x: np.ndarray,
    y: np.ndarray | None,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    stratify: bool,
) -> tuple[Splits, dict[str, np.ndarray | None]]:
    """A seeded train/val/test split; a fraction of 0 gives an empty split."""
    parts = split_indices(len(x), y, val_fraction, test_fraction, seed, stratify)
    xs = {s: x[idx] for s, idx in parts.items()}
    ys = {s: None if y is None else y[idx] for s, idx in parts.items()}
    return xs, ys


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
    """The example indices of each split (see :func:`split_arrays`).

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
        value_range = _range(out["train"])
    elif method == "none":
        out = dict(xs)
        value_range = _range(train)
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


def _range(x: np.ndarray) -> tuple[float, float]:
    return (float(np.min(x)), float(np.max(x))) if x.size else (0.0, 1.0)


def _cwd_note(path: Path) -> str:
    return f"resolved to {path.resolve()}" if not path.is_absolute() else "absolute path"


def _missing_file_message(path: Path) -> str:
    message = f"npz file not found: {path} ({_cwd_note(path)})"
    folder = path.parent if str(path.parent) else Path(".")
    if folder.is_dir():
        names = [p.name for p in folder.iterdir() if p.is_file()]
        similar = close_matches(path.name, names)
        if similar:
            message += f"; did you mean: {', '.join(str(folder / s) for s in similar)}?"
    return message


def _npz_array(path: Path, arrays: dict[str, np.ndarray], key: str, param: str) -> np.ndarray:
    if key in arrays:
        return arrays[key]
    available = ", ".join(sorted(arrays)) or "(none)"
    message = f"{path} has no array named '{key}' ({param}); arrays in the file: {available}"
    similar = close_matches(key, arrays)
    if similar:
        message += f"; did you mean: {', '.join(similar)}?"
    raise DlpipeError(message)


def _features(path: Path, x: np.ndarray) -> np.ndarray:
    """Features as float32 ``(n, d)`` tables or ``(n, h, w, c)`` images."""
    if x.ndim == 1:
        return x.astype(np.float32)[:, np.newaxis]
    if x.ndim == 2:
        return x.astype(np.float32)
    if x.ndim == 3:
        if min(x.shape[1:]) > 1:  # (n, h, w): grayscale images without a channel axis
            return x.astype(np.float32)[..., np.newaxis]
        return x.reshape(len(x), -1).astype(np.float32)
    if x.ndim == 4:
        return x.astype(np.float32)
    raise DlpipeError(
        f"{path}: features have shape {x.shape}; expected (n, features), (n, h, w) "
        "or (n, h, w, channels)"
    )


def _sample_weights(path: Path, w: np.ndarray, n: int) -> np.ndarray:
    """Weights as float32 ``(n,)``; their values were checked by ``check_arrays``."""
    w = np.ravel(w) if w.ndim == 2 and w.shape[1] == 1 else w
    if w.ndim != 1 or len(w) != n:
        raise DlpipeError(f"{path}: sample weights have shape {w.shape}; expected ({n},)")
    return w.astype(np.float32)


def _class_labels(y: np.ndarray) -> np.ndarray:
    """Labels checked by ``check_arrays`` (whole numbers from 0) as int32 ``(n,)``."""
    return np.ravel(y).astype(np.int32)


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )


def _load_image(file: Path, mode: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(file) as img:  # a GIF gives its first frame
            array = np.asarray(img.convert(mode), dtype=np.float32)
    except OSError as exc:
        raise DlpipeError(f"cannot read image {file}: {exc}") from exc
    return array[..., np.newaxis] if array.ndim == 2 else array


def _resize_each(images: list[np.ndarray], size: tuple[int, int]) -> list[np.ndarray]:
    """Resize images of possibly different sizes, one batch per distinct size."""
    out: list[np.ndarray] = list(images)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, img in enumerate(images):
        by_shape.setdefault(img.shape, []).append(i)
    for indices in by_shape.values():
        resized = resize_images(np.stack([images[i] for i in indices]), size)
        for i, img in zip(indices, resized, strict=True):
            out[i] = img
    return out
