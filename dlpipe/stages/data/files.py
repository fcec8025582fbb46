"""The data stages of local files: ``npz`` (arrays) and ``image_directory`` (a folder
of class sub-folders of images), and :func:`resolve_input`, which finds the file or
folder a spec names. Both stages check the arrays as read, before converting them.
``image_directory`` leaves large folders on disk (``stream``; see
:mod:`dlpipe.stages.data.streaming`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dlpipe import datacheck
from dlpipe.data import resize_images
from dlpipe.errors import DlpipeError, close_matches
from dlpipe.stages.data.finish import finish

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")


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
    datacheck.check_arrays(
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
    finish(ctx, params, path.stem, x, y, task, class_names, weights=weights, source=str(path))


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
    if _streams(params, files_by_class):
        from dlpipe.stages.data.streaming import stream_image_files

        stream_image_files(ctx, params, root, files_by_class)
        return

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
    finish(ctx, params, root.name, x, y, "classification", list(files_by_class), resize=False,
            source=str(root))


def _streams(params: Any, files_by_class: dict[str, list[Path]]) -> bool:
    """Whether ``image_directory`` leaves the images on disk: ``stream`` true, or
    ``auto`` and the decoded float32 images would take more than ``max_in_memory_mb``
    (estimated from the file count and ``image_size``, or the first image's size)."""
    if params.stream != "auto":
        if params.stream:
            print("data: image_directory streams the images from the files (stream: true)")
        return bool(params.stream)
    count = sum(len(files) for files in files_by_class.values())
    if params.limit is not None:
        count = min(count, params.limit)
    if params.image_size is not None:
        height, width = params.image_size
    else:
        from dlpipe.stages.data.streaming import image_size_of

        height, width = image_size_of(next(iter(files_by_class.values()))[0])
    channels = 1 if params.color_mode == "grayscale" else 3
    megabytes = count * height * width * channels * 4 / 2**20
    if megabytes <= params.max_in_memory_mb:
        return False
    print(f"data: image_directory: {count} images of {height}x{width}x{channels} take "
          f"{megabytes:,.0f} MB as float32, more than max_in_memory_mb "
          f"({params.max_in_memory_mb:g}); streaming them from the files")
    return True


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
