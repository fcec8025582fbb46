"""U-Net for semantic segmentation: the ``unet`` architecture.

A segmentation network labels every pixel. The U-Net (Ronneberger, Fischer and Brox,
2015) does it with two halves shaped like a "U":

- the **encoder** (contracting path) repeats a block of 3x3 convolutions followed by a
  2x2 max pooling. Each level halves the resolution and doubles the filters, so the
  features grow more abstract ("this is part of a triangle") and their receptive field
  grows, but they lose *where* exactly things are;
- the **decoder** (expanding path) climbs back up: each level doubles the resolution
  (a stride-2 transposed convolution, or an ``UpSampling2D`` and a 3x3 convolution)
  and runs another conv block;
- **skip connections** concatenate each encoder level's feature maps into the decoder
  level of the same resolution. The decoder then sees both the coarse "what" from
  below and the sharp "where" from the encoder, which is what makes U-Net boundaries
  crisp. With ``skip_connections: false`` the model is a plain encoder-decoder whose
  every detail has to squeeze through the bottleneck; comparing the two runs shows
  what the skips buy (blurrier, blobby masks and a lower mean IoU without them).

A final 1x1 convolution maps the features to one score per class and pixel, and a
softmax turns them into per-pixel class probabilities ``(batch, h, w, classes)``. The
targets are integer masks ``(batch, h, w)``, so the loss is
``sparse_categorical_crossentropy`` averaged over pixels, and ``accuracy`` is pixel
accuracy. Mean IoU and Dice are computed by the ``segmentation_report`` stage
(:mod:`dlpipe.stages.reports.segmentation`).

Padding is ``same`` everywhere (the paper's unpadded convolutions crop the output), so
the output has the input's height and width; both must divide by ``2**depth``. The
model is an ordinary functional ``keras.Model``: it saves and reloads without custom
objects.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import keras
import numpy as np
from keras import layers

from dlpipe.data import DataBundle
from dlpipe.errors import DlpipeError
from dlpipe.models.unet import UNetParams


def conv_block(
    x: Any,
    filters: int,
    name: str,
    *,
    convs: int = 2,
    batchnorm: bool = True,
    dropout: float = 0.0,
    activation: str = "relu",
) -> Any:
    """``convs`` times [3x3 conv, batch norm, activation], then spatial dropout."""
    for i in range(convs):
        x = layers.Conv2D(
            filters, 3, padding="same", use_bias=not batchnorm, name=f"{name}_conv{i}"
        )(x)
        if batchnorm:
            # momentum 0.9, not Keras's 0.99: the moving statistics used at inference
            # catch up within a few dozen steps, so short runs validate sensibly.
            x = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn{i}")(x)
        x = layers.Activation(activation, name=f"{name}_act{i}")(x)
    if dropout > 0:
        # Drops whole feature maps: neighbouring pixels are too correlated for
        # per-pixel dropout to regularize much.
        x = layers.SpatialDropout2D(dropout, name=f"{name}_dropout")(x)
    return x


def upsample(x: Any, filters: int, mode: str, name: str, activation: str = "relu") -> Any:
    """Double the height and width: a learned transposed convolution, or a fixed
    (bilinear / nearest) resize followed by a learned 3x3 convolution."""
    if mode == "transpose":
        return layers.Conv2DTranspose(filters, 2, strides=2, padding="same", name=f"{name}_up")(x)
    x = layers.UpSampling2D(2, interpolation=mode, name=f"{name}_resize")(x)
    return layers.Conv2D(
        filters, 3, padding="same", activation=activation, name=f"{name}_up"
    )(x)


def build_unet(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    depth: int = 3,
    base_filters: int = 16,
    skip_connections: bool = True,
    convs_per_block: int = 2,
    batchnorm: bool = True,
    dropout: float = 0.0,
    upsampling: str = "transpose",
    activation: str = "relu",
    name: str = "unet",
) -> keras.Model:
    """The U-Net as a functional model: ``(h, w, c)`` images to ``(h, w, num_classes)``
    per-pixel softmax probabilities."""
    check_input(input_shape, depth)
    block = partial(
        conv_block,
        convs=convs_per_block,
        batchnorm=batchnorm,
        dropout=dropout,
        activation=activation,
    )
    inputs = keras.Input(shape=input_shape, name="image")
    x = inputs

    # Encoder: keep each level's output for the skip connection, then halve.
    skips = []
    for level in range(depth):
        x = block(x, base_filters * 2**level, f"enc{level}")
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"enc{level}_pool")(x)

    x = block(x, base_filters * 2**depth, "bottleneck")

    # Decoder: double, join the encoder features of the same size, refine.
    for level in reversed(range(depth)):
        filters = base_filters * 2**level
        x = upsample(x, filters, upsampling, f"dec{level}", activation)
        if skip_connections:
            x = layers.Concatenate(name=f"dec{level}_skip")([x, skips[level]])
        x = block(x, filters, f"dec{level}")

    # float32 output: softmax and the loss stay exact under mixed precision.
    outputs = layers.Conv2D(
        num_classes, 1, activation="softmax", dtype="float32", name="class_probabilities"
    )(x)
    return keras.Model(inputs, outputs, name=name)


def check_input(input_shape: tuple[int, ...], depth: int) -> None:
    """Raise :class:`DlpipeError` unless ``input_shape`` is an image whose sides divide
    by ``2**depth`` (every level halves them, the decoder doubles them back)."""
    if len(input_shape) != 3:
        raise DlpipeError(
            f"unet: needs images (height, width, channels), got input shape {input_shape}"
        )
    factor = 2**depth
    height, width = input_shape[:2]
    if height % factor or width % factor:
        raise DlpipeError(
            f"unet: depth {depth} halves the image {depth} times, so height and width must "
            f"divide by {factor}; got {height}x{width}. Lower model.depth or change the "
            "image size (data param size / image_size)."
        )


def num_classes_of(data: DataBundle) -> int:
    """The data's class count, or ``1 + the largest mask value`` when it has none."""
    num_classes = getattr(data, "num_classes", None)
    if num_classes:
        return int(num_classes)
    y = data.y.get("train")
    if y is None or len(y) == 0:
        raise DlpipeError("unet: the data has neither num_classes nor training masks")
    return max(int(np.max(y)) + 1, 2)


def build(params: UNetParams, data: DataBundle) -> keras.Model:
    """The registered builder: an uncompiled U-Net for ``data`` (train it with
    ``loss: sparse_categorical_crossentropy``)."""
    return build_unet(
        tuple(data.input_shape),
        num_classes_of(data),
        depth=params.depth,
        base_filters=params.base_filters,
        skip_connections=params.skip_connections,
        convs_per_block=params.convs_per_block,
        batchnorm=params.batchnorm,
        dropout=params.dropout,
        upsampling=params.upsampling,
        activation=params.activation,
        name="unet" if params.skip_connections else "encoder_decoder",
    )


def example_data() -> DataBundle:
    """A tiny segmentation bundle for the conformance test: 8x8 RGB shapes and masks."""
    from dlpipe.datasets.shapes import SHAPES, generate_scenes

    x: dict[str, np.ndarray] = {}
    y: dict[str, np.ndarray | None] = {}
    for i, split in enumerate(("train", "val", "test")):
        scenes = generate_scenes(16, size=8, objects=(1, 2), noise=0.05, seed=i)
        x[split], y[split] = scenes.images, scenes.masks
    return DataBundle(
        x=x,
        y=y,
        task="segmentation",
        num_classes=len(SHAPES) + 1,
        class_names=["background", *SHAPES],
        name="tiny_shapes_segmentation",
    )
