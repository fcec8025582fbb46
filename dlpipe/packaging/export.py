"""Inference-only exports of a model: a TensorFlow SavedModel and ONNX, both taking
raw inputs."""

from __future__ import annotations

import contextlib
import io
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dlpipe.packaging.preprocessing import Preprocessing


def _serving_function(model: Any, meta: Mapping[str, Any]) -> tuple[Any, Any] | None:
    """``(fn, input_specs)`` of the exported endpoint (raw inputs in, as ``predict``
    but without text, NMS or sampling loops), or ``None`` where the mode has no graph
    form."""
    import tensorflow as tf

    mode = meta.get("mode")
    prep = Preprocessing.from_dict(meta.get("preprocessing"))
    if prep.method == "unknown":
        return None
    shape = [None, *meta.get("model_input_shape", [])]
    image = len(shape) == 4

    def constant(v: Any) -> Any:
        return tf.constant(np.asarray(v, dtype=np.float32))

    def normalize(x: Any) -> Any:
        if image and prep.image_size is not None:
            size = list(prep.image_size)
            x = tf.cond(
                tf.reduce_all(tf.equal(tf.shape(x)[1:3], size)),
                lambda: x,
                lambda: tf.image.resize(x, size, method="bilinear", antialias=True),
            )
        if prep.method == "minmax":
            return (x - constant(prep.low)) * constant(prep._minmax_scale()) + prep.target[0]
        if prep.method == "standard":
            return (x - constant(prep.mean)) / constant(prep._std())
        return x

    def denormalize(x: Any) -> Any:
        if prep.method == "minmax":
            return (x - prep.target[0]) / constant(prep._minmax_scale()) + constant(prep.low)
        if prep.method == "standard":
            return x * constant(prep._std()) + constant(prep.mean)
        return x

    def first(out: Any) -> Any:
        return out[0] if isinstance(out, (list, tuple)) else out

    if image and prep.image_size is not None:
        shape[1:3] = [None, None]
    spec = [tf.TensorSpec(shape, tf.float32, name="inputs")]
    if mode in ("classify", "segment", "detect"):
        return (lambda x: first(model(normalize(x), training=False))), spec
    if mode == "reconstruct":
        return (lambda x: denormalize(first(model(normalize(x), training=False)))), spec
    if mode == "upscale":
        low, high = (float(v) for v in meta.get("value_range", (0.0, 1.0)))
        shape[1:3] = [None, None]
        spec = [tf.TensorSpec(shape, tf.float32, name="inputs")]
        return (lambda x: denormalize(tf.clip_by_value(model.upscale(normalize(x)), low, high))), spec
    if mode == "embed":
        return (lambda x: model.encode_images(normalize(x), training=False)), spec
    if mode == "caption" and hasattr(model, "greedy_probabilities"):
        # Greedy decoding in the graph: token probabilities; argmax gives the ids.
        return (lambda x: model.greedy_probabilities(normalize(x))), spec
    if mode in ("translate", "classify_text") and "source_length" in meta:
        ids = [tf.TensorSpec([None, int(meta["source_length"])], tf.int32, name="token_ids")]
        return (lambda x: first(model(x, training=False))), ids
    generate = getattr(model, "generate", None) or getattr(model, "decode", None)
    latent_dim = getattr(model, "latent_dim", None)
    if mode == "sample" and callable(generate) and latent_dim and not hasattr(model, "to_diffusion"):
        # A GAN's generator or a conditional VAE's decoder: latent vectors (and class
        # ids) in, samples in raw units out.
        low, high = (float(v) for v in meta.get("value_range", (0.0, 1.0)))
        z = tf.TensorSpec([None, int(latent_dim)], tf.float32, name="z")

        def samples(z: Any, labels: Any = None) -> Any:
            out = tf.cast(generate(z, labels, training=False), tf.float32)
            return denormalize(tf.clip_by_value(out, low, high))

        if meta.get("conditional"):
            return samples, [z, tf.TensorSpec([None], tf.int32, name="labels")]
        return (lambda z: samples(z)), [z]
    return None


def export_saved_model(model: Any, meta: Mapping[str, Any], path: Path) -> str | None:
    """Write an inference-only TF SavedModel with one endpoint, ``serve``; returns
    ``None``, or why the model does not export."""
    import keras

    found = _serving_function(model, meta)
    if found is None:
        return f"mode {meta.get('mode')!r} has no graph form (it decodes or samples in Python)"
    fn, specs = found
    archive = keras.export.ExportArchive()
    try:
        archive.track(model)
        archive.add_endpoint(name="serve", fn=fn, input_signature=specs)
        with contextlib.redirect_stdout(io.StringIO()):
            archive.write_out(str(path), verbose=False)
    except Exception as exc:
        shutil.rmtree(path, ignore_errors=True)
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    return None


def export_onnx(model: Any, meta: Mapping[str, Any], path: Path) -> str | None:
    """The ``serve`` endpoint of :func:`export_saved_model` as ONNX, converted by
    tf2onnx (the optional ``onnx`` extra); returns ``None``, or why not."""
    try:
        import tf2onnx
    except ImportError:
        return "tf2onnx is not installed (pip install 'dlpipe[onnx]')"
    import tensorflow as tf

    found = _serving_function(model, meta)
    if found is None:
        return f"mode {meta.get('mode')!r} has no graph form"
    fn, specs = found
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            tf2onnx.convert.from_function(
                tf.function(fn), input_signature=specs, output_path=str(path)
            )
        _check_onnx(path)
    except Exception as exc:
        Path(path).unlink(missing_ok=True)
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    return None


def _check_onnx(path: Path) -> None:
    """tf2onnx sometimes writes a graph ONNX Runtime refuses (a ``Bitcast`` node, say):
    open it with ONNX Runtime when installed, else run ONNX's checker."""
    try:
        import onnxruntime
    except ImportError:
        import onnx

        onnx.checker.check_model(str(path))
        return
    onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
