"""The augment stage: Keras preprocessing layers that run inside the input pipeline.

The layers are appended to ``ctx.data.augmenters``; :meth:`DataBundle.dataset`
applies them to training batches when called with ``augment=True``.
"""

from __future__ import annotations

from typing import Any

from dlpipe.errors import DlpipeError, close_matches

FLIP_MODES = ("horizontal", "vertical", "horizontal_and_vertical")


def keras_layers(ctx: Any, params: Any) -> None:
    """Add flip, rotation, zoom, translation, contrast and noise layers (each if set)."""
    data = ctx.data
    if data is None:
        raise DlpipeError("the augment stage needs a data stage before it")
    if not data.is_image:
        raise DlpipeError(
            f"the augment stage works on images (n, height, width, channels), but the data "
            f"'{data.name}' has examples of shape {data.input_shape}"
        )
    geometric = [k for k in ("flip", "rotation", "zoom", "translation")
                 if getattr(params, k) is not None]
    if data.task in ("detection", "segmentation") and geometric:
        target = "boxes" if data.task == "detection" else "masks"
        raise DlpipeError(
            f"augment: {', '.join(geometric)} would move the images but not their {target}; "
            f"for {data.task} data use only contrast and noise"
        )
    seed = params.seed if params.seed is not None else ctx.seed
    layers = build_layers(params, seed, value_range=tuple(data.value_range))
    if not layers:
        print("augment: no layers configured; the training data is left as it is")
        return
    data.augmenters.extend(layer for layer, _ in layers)
    print(f"augment: {', '.join(label for _, label in layers)} (training split only)")


def build_layers(
    params: Any, seed: int, *, value_range: tuple[float, float] = (0.0, 1.0)
) -> list[tuple[Any, str]]:
    """The Keras layers the params ask for, in a fixed order, with a label for each."""
    import keras

    if params.flip is not None and params.flip not in FLIP_MODES:
        hint = close_matches(params.flip, FLIP_MODES)
        did_you_mean = f"; did you mean: {', '.join(hint)}?" if hint else ""
        raise DlpipeError(
            f"augment flip '{params.flip}' is not one of {', '.join(FLIP_MODES)}{did_you_mean}"
        )

    fmt = "channels_last"
    layers: list[tuple[Any, str]] = []

    def add(layer: Any, setting: Any) -> None:
        layers.append((layer, f"{type(layer).__name__}({setting})"))

    # Each layer gets its own seed, so that layers don't draw the same random numbers.
    if params.flip is not None:
        add(keras.layers.RandomFlip(params.flip, seed=seed, data_format=fmt), params.flip)
    if params.rotation is not None:
        add(keras.layers.RandomRotation(params.rotation, seed=seed + 1, data_format=fmt),
            params.rotation)
    if params.zoom is not None:
        add(keras.layers.RandomZoom(params.zoom, seed=seed + 2, data_format=fmt), params.zoom)
    if params.translation is not None:
        factor = params.translation
        add(keras.layers.RandomTranslation(factor, factor, seed=seed + 3, data_format=fmt),
            factor)
    if params.contrast is not None:
        # RandomContrast clips its output to value_range: give it the data's range.
        add(keras.layers.RandomContrast(params.contrast, value_range=value_range, seed=seed + 4),
            params.contrast)
    if params.noise is not None:
        add(keras.layers.GaussianNoise(params.noise, seed=seed + 5), params.noise)
    return layers
