"""``dlpipe predict`` and ``dlpipe serve``: use what you trained.

A model is named the way a user knows it: a run id, a unique id prefix or a run name,
``runs:/...``, ``models:/NAME@alias``, or a file. :mod:`dlpipe.packaging` turns that into
an MLflow model URI and a predictor, which takes raw inputs (as the data source had
them) and applies the data stage's preprocessing itself.

Inputs come from an ``.npz``, a folder of images, a ``.csv`` of numbers, or a spec
(the test split of its data stage). Predictions go to a CSV for tables, a PNG grid
(and an ``.npz``) for images, and an ``.npz`` otherwise.
"""

from __future__ import annotations

import csv
import json
import os
import re
import socket
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dlpipe.errors import DlpipeError
from dlpipe.runs import RunResolver, cli_hint, open_store

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
SPEC_SUFFIXES = {".yaml", ".yml"}
#: CSV columns kept aside as the true labels rather than fed to the model.
LABEL_COLUMNS = ("label", "target", "y", "class")
#: At most this many images go into a PNG grid (the npz beside it has them all).
GRID_LIMIT = 64


# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------


@dataclass
class Inputs:
    """What to predict on: ``x`` is an array, or a dict of arrays for models that take
    several inputs; ``labels`` are the true values when the input had them."""

    x: Any
    source: str
    labels: np.ndarray | None = None
    class_names: list[str] = field(default_factory=list)
    #: A name per example (image file names); default: its index.
    names: list[str] | None = None

    def __len__(self) -> int:
        first = next(iter(self.x.values())) if isinstance(self.x, dict) else self.x
        return int(len(first))


@dataclass
class Expected:
    """What the predictor takes, from its ``input_description``: the kind (``image``,
    ``table``, ``text``, ``labels``), the shape with ``None`` for free sizes, and the
    data stage's normalization (which the predictor applies to raw inputs itself)."""

    kind: str | None = None
    shape: list[int | None] | None = None
    preprocessing: Any = None

    @classmethod
    def of(cls, predictor: Any) -> Expected:
        description = getattr(predictor, "input_description", None)
        if not isinstance(description, Mapping):
            return cls(preprocessing=_preprocessing(predictor))
        shape = description.get("shape")
        return cls(description.get("kind"), list(shape) if shape else None,
                   _preprocessing(predictor))


def read_inputs(text: str, expected: Expected | None = None,
                plugin_dirs: Sequence[str] | None = None) -> Inputs:
    """Read INPUT as the predictor takes it (see :class:`Expected`)."""
    expected = expected or Expected()
    path = Path(text)
    if not path.exists():
        raise DlpipeError(f"{text}: no such file or folder; INPUT is an .npz, a .csv, "
                          "a folder of images or a spec")
    if path.is_dir():
        return read_image_folder(path, expected)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return read_npz(path)
    if suffix == ".npy":
        return Inputs(np.load(path, allow_pickle=False), path.name)
    if suffix == ".csv":
        return read_csv(path, text=expected.kind == "text")
    if suffix in SPEC_SUFFIXES:
        return read_spec_test_split(path, expected, plugin_dirs)
    if suffix in IMAGE_SUFFIXES:
        raise DlpipeError(f"{text}: give the folder the images are in, not one image")
    raise DlpipeError(f"{text}: unknown input kind {suffix or '(no suffix)'}; expected "
                      ".npz, .npy, .csv, a spec (.yaml) or a folder of images")


def read_npz(path: Path) -> Inputs:
    """Array ``x`` (and ``y`` as labels), or the only array, or all of them as a dict."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    labels = arrays.pop("y", None)
    if not arrays:
        raise DlpipeError(f"{path}: holds no input arrays (expected x, or one array)")
    if "x" in arrays:
        x: Any = arrays["x"]
    elif len(arrays) == 1:
        x = next(iter(arrays.values()))
    else:
        x = arrays  # a model with several inputs, by name
    return Inputs(x, path.name, labels=labels)


def read_csv(path: Path, text: bool = False) -> Inputs:
    """A table of numbers (or, for text models, one text per row), with or without a
    header row; a column named label, target, y or class is kept aside as the labels."""
    with open(path, newline="") as handle:
        rows = [row for row in csv.reader(handle) if any(cell.strip() for cell in row)]
    if not rows:
        raise DlpipeError(f"{path}: is empty")
    header: list[str] | None = None
    names = [c.strip().lower() for c in rows[0]]
    if (text and any(n in LABEL_COLUMNS + ("text",) for n in names)) or (
            not text and not all(_is_number(cell) for cell in rows[0])):
        header, rows = [c.strip() for c in rows[0]], rows[1:]
    if not rows:
        raise DlpipeError(f"{path}: has a header but no rows")
    width = len(header) if header else len(rows[0])
    first_line = 2 if header else 1
    for number, row in enumerate(rows, start=first_line):
        if len(row) != width:
            raise DlpipeError(f"{path}:{number}: {len(row)} values; the first row has {width}")
    label_at = next((i for i, name in enumerate(header or []) if name.lower() in LABEL_COLUMNS),
                    None)
    features = [i for i in range(width) if i != label_at]
    labels = None
    if label_at is not None:
        raw = [row[label_at].strip() for row in rows]
        labels = np.array([float(v) for v in raw]) if all(_is_number(v) for v in raw) \
            else np.array(raw)
    if text:
        return Inputs(np.array([row[features[0]] for row in rows], dtype=object), path.name,
                      labels=labels)
    values = np.empty((len(rows), len(features)), dtype=np.float32)
    for r, row in enumerate(rows):
        for c, i in enumerate(features):
            if not _is_number(row[i]):
                column = header[i] if header else str(i + 1)
                raise DlpipeError(f"{path}:{r + first_line}: column {column}: "
                                  f"{row[i]!r} is not a number")
            values[r, c] = float(row[i])
    return Inputs(values, path.name, labels=labels)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def read_image_folder(folder: Path, expected: Expected) -> Inputs:
    """Every image in ``folder`` (sorted by name), resized to the model's input size
    and channels where known (else they must all have one size). Pixels are read as
    0..1 and mapped onto the training data's range when its data stage scaled it
    (min-max), since the predictor takes values as the data source had them."""
    from PIL import Image

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DlpipeError(f"{folder}: no images (.png, .jpg, ...) in this folder")
    size: tuple[int, int] | None = None  # PIL order: (width, height)
    channels: int | None = None
    prep = expected.preprocessing
    if expected.shape and len(expected.shape) == 4:
        height, width, depth = expected.shape[1:]
        if height and width:
            size = (int(width), int(height))
        channels = int(depth) if depth else None
    if size is None and prep is not None and prep.image_size:
        size = (int(prep.image_size[1]), int(prep.image_size[0]))
    arrays = []
    for path in files:
        with Image.open(path) as image:
            mode = {1: "L", 3: "RGB", 4: "RGBA"}.get(channels or 0) or (
                "L" if image.mode in ("L", "1", "I", "F") else "RGB")
            converted = image.convert(mode)
            if size is not None and converted.size != size:
                converted = converted.resize(size, Image.Resampling.BILINEAR)
            array = np.asarray(converted, dtype=np.float32) / 255.0
        arrays.append(array[..., None] if array.ndim == 2 else array)
    shapes = sorted({a.shape for a in arrays})
    if len(shapes) > 1:
        raise DlpipeError(f"{folder}: the images have different sizes "
                          f"({', '.join(map(str, shapes))}) and the model's input size is not known")
    x = np.stack(arrays)
    if prep is not None and prep.method == "minmax" and np.size(prep.low) == 1:
        low, high = float(np.ravel(prep.low)[0]), float(np.ravel(prep.high)[0])
        x = (low + x * (high - low)).astype(np.float32)
    return Inputs(x, f"{len(files)} images in {folder}", names=[p.name for p in files])


def read_spec_test_split(path: Path, expected: Expected,
                         plugin_dirs: Sequence[str] | None) -> Inputs:
    """Run the spec's data stages (nothing else, nothing tracked) and take the test
    split, in the units the predictor takes: raw (the data stage's normalization
    undone, since the predictor applies it), texts for text models."""
    from dlpipe.context import RunContext
    from dlpipe.engine import configure_backend, run_stage
    from dlpipe.plugins import load_plugins
    from dlpipe.spec import read_spec_file, spec_plugins, validate

    doc = read_spec_file(str(path))
    host = load_plugins(plugin_dirs=plugin_dirs, spec_plugins=spec_plugins(doc),
                        spec_dir=path.resolve().parent)
    spec = validate(doc, host.registry, [])
    data_stages = []
    for stage in spec.stages:
        if stage.kind == "model":
            break
        if stage.kind == "data":
            data_stages.append(stage)
    if not data_stages:
        raise DlpipeError(f"{path}: has no data stage before its model to take inputs from")
    configure_backend(spec.settings.seed, spec.settings.precision)
    with tempfile.TemporaryDirectory(prefix="dlpipe-predict-") as run_dir:
        ctx = RunContext(spec=spec, plugins=host, run_dir=Path(run_dir))
        for stage in data_stages:
            run_stage(ctx, stage)
    data = ctx.data
    if data is None or data.size("test") == 0:
        raise DlpipeError(f"{path}: its data stage made no test split to predict on")
    labels = data.y.get("test")
    x: Any = data.x["test"]
    texts_by_split = getattr(data, "texts", None)  # caption and sequence bundles
    if expected.kind == "text" and texts_by_split:
        texts = texts_by_split["test"]
        x = np.asarray(list(texts[0] if isinstance(texts, tuple) else texts), dtype=object)
    elif expected.kind == "labels":
        x = labels if labels is not None else np.zeros(data.size("test"), dtype=np.int64)
    elif expected.preprocessing is not None and isinstance(x, np.ndarray):
        x = expected.preprocessing.denormalize(x)
    if labels is not None and np.ndim(labels) != 1:
        labels = None  # targets that are not one label per example
    return Inputs(x, f"the test split of {path}", labels=labels,
                  class_names=list(data.class_names))


# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------


def _is_reference(text: str) -> bool:
    """A full run id, a URI or an existing path: :mod:`dlpipe.packaging` takes it as is."""
    return (bool(re.fullmatch(r"[0-9a-f]{32}", text)) or text.startswith(("runs:/", "models:/"))
            or "://" in text or Path(text).exists())


def model_reference(text: str, uri: str) -> str:
    """MODEL as :func:`dlpipe.packaging.resolve_model_uri` takes it: an id prefix or a
    run name becomes the run's id (the newest run of that name)."""
    text = text.strip()
    if Path(text).exists():
        return text
    client = open_store(uri)  # refuses a missing or damaged store before MLflow sees it
    if _is_reference(text):
        return text
    resolver = RunResolver(client, uri)
    run = resolver.resolve(text)
    for note in resolver.notes:
        print(note, flush=True)
    return str(run.info.run_id)


@dataclass
class LoadedModel:
    uri: str
    predictor: Any


def load_model(text: str, uri: str) -> LoadedModel:
    """MODEL as a :class:`dlpipe.packaging.Predictor`."""
    from dlpipe import packaging

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    model_uri = packaging.resolve_model_uri(model_reference(text, uri), uri)
    return LoadedModel(model_uri, packaging.load_predictor(model_uri, uri))


def describe_input(description: Any) -> str:
    if isinstance(description, Mapping):
        shape = description.get("shape")
        text = description.get("text") or description.get("kind") or "inputs"
        if shape:
            shown = ", ".join("n" if i == 0 else ("?" if d is None else str(d))
                              for i, d in enumerate(shape))
            return f"{text}; shape ({shown})"
        return str(text)
    return str(description)


def _preprocessing(predictor: Any) -> Any:
    """The data stage's normalization the predictor applies itself (or ``None``)."""
    from dlpipe import packaging

    record = (getattr(predictor, "meta", None) or {}).get("preprocessing")
    return packaging.Preprocessing.from_dict(record) if record else None


# --------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------

#: Outputs that are pictures, in the order a grid prefers them (see
#: ``dlpipe.packaging.MODES``); other image-shaped outputs go into the grid too.
IMAGE_OUTPUTS = ("image", "reconstruction", "samples", "mask")


def picture(outputs: Mapping[str, np.ndarray]) -> tuple[str, np.ndarray] | None:
    """The output to draw as a grid: a named one, else any ``(n, h, w, 1|3|4)`` array."""
    for name in IMAGE_OUTPUTS:
        array = outputs.get(name)
        if array is not None and array.ndim in (3, 4) and min(array.shape[1:3]) >= 4:
            return name, array
    for name, array in outputs.items():
        if name != "probabilities" and array.ndim == 4 and array.shape[-1] in (1, 3, 4) \
                and min(array.shape[1:3]) >= 4:
            return name, array
    return None


def is_table(outputs: Mapping[str, np.ndarray], n: int) -> bool:
    return all(a.ndim in (1, 2) and len(a) == n for a in outputs.values())


def output_kind(outputs: Mapping[str, np.ndarray], n: int) -> str:
    if is_table(outputs, n):
        return "csv"
    if picture(outputs) is not None:
        return "png"
    return "npz"


def write_csv(path: Path, outputs: Mapping[str, np.ndarray], inputs: Inputs) -> list[str]:
    """One row per example: its name, its true label when the input had labels, then
    the outputs; a 2-D output is a column per entry (``probabilities_<class>``)."""
    n = len(inputs)
    columns: list[tuple[str, Any]] = [("input", inputs.names or list(range(n)))]
    if inputs.labels is not None and len(inputs.labels) == n:
        columns.append(("true_label", inputs.labels))
    # One-value outputs (label, class_name, text) before per-entry ones.
    for key, array in sorted(outputs.items(), key=lambda item: item[1].ndim):
        if array.ndim == 1:
            columns.append((key, array))
            continue
        names = [str(c) for c in inputs.class_names] \
            if key == "probabilities" and len(inputs.class_names) == array.shape[1] \
            else [str(j) for j in range(array.shape[1])]
        columns += [(f"{key}_{name}", array[:, j]) for j, name in enumerate(names)]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([name for name, _ in columns])
        for i in range(n):
            writer.writerow([_cell(values[i]) for _, values in columns])
    return [name for name, _ in columns]


def _cell(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.6g}"
    return str(value)


def write_npz(path: Path, outputs: Mapping[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.asarray(v) for k, v in outputs.items()}
    # Text outputs as fixed-width unicode, so the file loads without allow_pickle.
    arrays = {k: v.astype(str) if v.dtype == object else v for k, v in arrays.items()}
    np.savez_compressed(path, **arrays)  # type: ignore[arg-type]


def write_grid(path: Path, images: np.ndarray, names: Sequence[str] | None) -> int:
    """The first :data:`GRID_LIMIT` images in a grid; returns how many."""
    from matplotlib.figure import Figure

    shown = np.asarray(images[:GRID_LIMIT])
    is_mask = shown.ndim == 3 or not np.issubdtype(shown.dtype, np.floating)
    if not is_mask:
        shown = shown.astype(np.float32)
        low, high = float(shown.min()), float(shown.max())
        if low < 0 or high > 1:  # raw units (0..16, 0..255) or a generator's [-1, 1]
            shown = (shown - low) / max(high - low, 1e-8)
    cols = min(8, len(shown))
    rows = -(-len(shown) // cols)
    fig = Figure(figsize=(1.4 * cols, 1.5 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= len(shown):
            continue
        image = shown[i]
        if is_mask:
            ax.imshow(image if image.ndim == 2 else image[..., 0], cmap="tab20",
                      interpolation="nearest")
        elif image.shape[-1] == 1:
            ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=1)
        else:
            ax.imshow(np.clip(image[..., :3], 0, 1))
        ax.set_title(names[i] if names else str(i), fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return len(shown)


def write_outputs(outputs: Mapping[str, np.ndarray], inputs: Inputs,
                  output: str | None) -> list[str]:
    """Write the predictions where ``-o`` says (its suffix picks the format) or to
    ``predictions.<csv|png|npz>``; returns what was written, as lines to print."""
    n = len(inputs)
    natural = output_kind(outputs, n)
    path = Path(output) if output else Path(f"predictions.{natural}")
    kind = path.suffix.lower().lstrip(".")
    if kind not in ("csv", "npz", "png"):
        raise DlpipeError(f"-o {path}: unknown output format; use .csv, .npz or .png")
    if kind == "csv" and not is_table(outputs, n):
        raise DlpipeError(f"-o {path}: these predictions are not a table "
                          f"({_shapes(outputs)}); write them as .{natural}")
    drawn = picture(outputs)
    if kind == "png" and drawn is None:
        raise DlpipeError(f"-o {path}: these predictions are not images "
                          f"({_shapes(outputs)}); write them as .{natural}")
    if kind == "csv":
        columns = write_csv(path, outputs, inputs)
        shown = ", ".join(columns[:8]) + (", ..." if len(columns) > 8 else "")
        return [f"wrote {path} ({n} rows; columns {shown})"]
    if kind == "png":
        assert drawn is not None
        count = write_grid(path, drawn[1], inputs.names)
        arrays = path.with_suffix(".npz")
        write_npz(arrays, outputs)
        return [f"wrote {path} (grid of {count} of {len(drawn[1])} images: {drawn[0]})",
                f"wrote {arrays} ({_shapes(outputs)})"]
    write_npz(path, outputs)
    return [f"wrote {path} ({_shapes(outputs)})"]


def _shapes(outputs: Mapping[str, np.ndarray]) -> str:
    return ", ".join(f"{k} {tuple(v.shape)}" for k, v in outputs.items())


def summary(outputs: Mapping[str, np.ndarray], inputs: Inputs) -> list[str]:
    """Class counts and accuracy against the input's labels; else the first texts or
    each output's value range."""
    lines = []
    classes = outputs.get("label")
    if classes is not None and classes.ndim == 1 and "probabilities" in outputs:
        names = outputs.get("class_name")
        shown = names if names is not None and len(names) == len(classes) else classes
        values, counts = np.unique(np.asarray(shown).astype(str), return_counts=True)
        lines.append("  predicted: " + ", ".join(
            f"{v} x{c}" for v, c in zip(values, counts, strict=True)))
        truth = inputs.labels
        if truth is not None and len(truth) == len(classes) \
                and np.issubdtype(np.asarray(truth).dtype, np.number):
            right = int(np.sum(np.asarray(truth).astype(np.int64) == classes))
            lines.append(f"  accuracy against the input's labels: {right / len(classes):.4f} "
                         f"({right}/{len(classes)})")
        return lines
    for key, array in outputs.items():
        if array.dtype.kind in "OUS":
            first = "; ".join(repr(str(v)) for v in np.ravel(array)[:3])
            lines.append(f"  {key}: {first}{' ...' if array.size > 3 else ''}")
        elif np.issubdtype(array.dtype, np.number) and array.size:
            lines.append(f"  {key}: shape {tuple(array.shape)}, values "
                         f"{float(array.min()):.4g} .. {float(array.max()):.4g}, "
                         f"mean {float(array.mean()):.4g}")
    return lines


def predict_command(model: str, input_text: str, output: str | None, uri: str,
                    plugin_dirs: Sequence[str] | None = None) -> list[str]:
    """What ``dlpipe predict`` does and prints. The model is loaded first: it says
    what it takes (image size, raw or normalized values, texts)."""
    loaded = load_model(model, uri)
    predictor = loaded.predictor
    inputs = read_inputs(input_text, Expected.of(predictor), plugin_dirs)
    try:
        outputs = predictor.predict(inputs.x)
    except DlpipeError:
        raise
    except Exception as exc:  # noqa: BLE001 - shapes and dtypes the model refuses
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        raise DlpipeError(
            f"{input_text}: the model could not predict on these inputs "
            f"({_input_shape(inputs.x)}): {type(exc).__name__}: {first}\n"
            f"    It takes {describe_input(predictor.input_description)}"
        ) from None
    return [
        f"model: {loaded.uri} (task {predictor.task}; takes "
        f"{describe_input(predictor.input_description)})",
        f"input: {len(inputs)} examples from {inputs.source}",
        *summary(outputs, inputs),
        *write_outputs(outputs, inputs, output),
    ]


def _input_shape(x: Any) -> str:
    if isinstance(x, Mapping):
        return ", ".join(f"{k} {tuple(np.shape(v))}" for k, v in x.items())
    return f"shape {tuple(np.shape(x))}"


# --------------------------------------------------------------------------------------
# dlpipe serve
# --------------------------------------------------------------------------------------


@dataclass
class ServePlan:
    """The scoring-server command, its environment, and what to print first."""

    model_uri: str
    command: list[str]
    environment: dict[str, str]
    lines: list[str]


def serve_command(model_uri: str, host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri,
            "--env-manager", "local", "-h", host, "-p", str(port)]


def serving_uri(text: str, uri: str) -> str:
    """MODEL as an MLflow model (with ``MLmodel``) the scoring server can load."""
    from dlpipe import packaging

    model_uri = packaging.resolve_model_uri(model_reference(text, uri), uri)
    if not model_uri.endswith(".keras"):
        return model_uri
    raise DlpipeError(
        f"{text}: {model_uri} is a bare Keras file, not an MLflow model; the scoring "
        "server needs an MLflow model (a folder with MLmodel), which this run did not "
        "log.\n    Use dlpipe predict with it, or serve a run that logged an MLflow model"
    )


def example_payload(model_uri: str, uri: str) -> str:
    """A request body for the example curl: the model's logged input example (one
    row), or a generic table row."""
    try:
        folder = _model_metadata(model_uri, uri)
        from mlflow.models import Model

        example = Model.load(str(folder)).load_input_example(str(folder))
        rows = np.asarray(example)[:1]
        if example is not None and 0 < rows.size <= 64 and rows.dtype.kind in "fiub":
            return json.dumps({"inputs": rows.tolist()})
    except Exception:  # noqa: BLE001 - the example is a nicety; fall back to a generic one
        pass
    return '{"inputs": [[0.0, 1.0]]}'


def _model_metadata(model_uri: str, uri: str) -> Path:
    """A folder with the model's ``MLmodel`` and input example (not its weights)."""
    if Path(model_uri).exists():
        return Path(model_uri)
    from mlflow.artifacts import download_artifacts
    from mlflow.models import Model

    folder = Path(tempfile.mkdtemp(prefix="dlpipe-serve-"))
    base = model_uri.rstrip("/")
    download_artifacts(artifact_uri=f"{base}/MLmodel", tracking_uri=uri, dst_path=str(folder))
    example = (Model.load(str(folder)).saved_input_example_info or {}).get("artifact_path")
    if example:
        download_artifacts(artifact_uri=f"{base}/{example}", tracking_uri=uri,
                           dst_path=str(folder))
    return folder


def check_port_free(host: str, port: int) -> None:
    """Fail in a line, before the model loads, when the address is taken."""
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise DlpipeError(f"cannot serve on {host}:{port}: {exc.strerror or exc}; "
                              "pick another port with --port") from None


def serve_plan(model: str, uri: str, host: str, port: int) -> ServePlan:
    """What ``dlpipe serve`` runs and prints first."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    check_port_free(host, port)
    model_uri = serving_uri(model, uri)
    url = f"http://{host}:{port}/invocations"
    payload = example_payload(model_uri, uri)
    environment = dict(os.environ, MLFLOW_TRACKING_URI=uri)
    lines = [
        f"serving {model_uri} from {uri}",
        f"  POST JSON to {url}  (Ctrl+C to stop; it takes a few seconds to start)",
        f"  example: curl -s {url} -H 'Content-Type: application/json' -d '{payload}'",
        f"  {cli_hint(uri)}",
    ]
    return ServePlan(model_uri, serve_command(model_uri, host, port), environment, lines)
