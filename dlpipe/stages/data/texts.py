"""The ``text_directory`` data stage: a folder of class sub-folders of ``.txt`` files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dlpipe.data import split_indices
from dlpipe.datasets.bundles import text_class_bundle
from dlpipe.errors import DlpipeError
from dlpipe.stages.data.files import class_folders, resolve_input
from dlpipe.stages.sequences.stage import publish_text_classes

TEXT_SUFFIX = ".txt"


def text_directory(ctx: Any, params: Any) -> None:
    """A folder with one sub-folder of ``.txt`` files per class (``path/<class>/<name>.txt``).

    Each file is one example: whitespace runs become single spaces, optionally lower
    case and cut to ``max_chars``. The texts are split with the seed like every data
    stage and tokenized per character (a ``tokenize`` stage may re-tokenize them); the
    result is a :class:`~dlpipe.datasets.bundles.TextClassBundle`.
    """
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
