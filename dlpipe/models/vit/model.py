"""Vision Transformer (Dosovitskiy et al., 2021), the ``vit`` architecture.

An image is cut into non-overlapping ``p x p`` patches and read as a sequence of
"words", one per patch:

1. **patch embedding**: a ``Conv2D`` with ``kernel = stride = p`` projects every patch
   to ``d_model`` numbers at once (the same as flattening each patch and applying one
   shared Dense layer); an ``H x W`` image becomes ``(H/p) * (W/p)`` tokens;
2. a learnable **[cls] token** is put in front of the patch tokens; its final state
   is what the classifier reads;
3. **learned positional embeddings**, one ``d_model`` vector per position (``1 +
   patches`` of them), are added, since attention alone does not know where a patch
   came from;
4. ``depth`` **encoder blocks**, pre-LayerNorm as in the paper:
   ``x + MHSA(LN(x))`` then ``x + MLP(LN(x))`` with a GELU MLP of ``mlp_dim`` units;
   the attention is :class:`dlpipe.models.attention.MultiHeadAttention`;
5. a final LayerNorm and a softmax **head on the [cls] token**.

A ViT has almost none of a CNN's built-in assumptions (locality, translation
equivariance): it must learn them from data. On small datasets it therefore trails a
CNN of similar size, and the gap closes as data grows; ``pipelines/vit_digits.yaml``
and ``pipelines/vit_cnn_baseline.yaml`` show this on the 8x8 scikit-learn digits.

The plot hook (:mod:`dlpipe.models.vit.plots`) overlays the last block's [cls] attention
over the patches (:func:`cls_attention`) on a few test images.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import layers, ops

from dlpipe.data import DataBundle
from dlpipe.errors import DlpipeError
from dlpipe.models.attention import MultiHeadAttention
from dlpipe.models.vit import ViTParams


def patch_grid(image_shape: tuple[int, ...], patch_size: int) -> tuple[int, int]:
    """``(rows, cols)`` of patches; raises :class:`DlpipeError` if the image does not tile."""
    if len(image_shape) != 3:
        raise DlpipeError(f"vit needs images (height, width, channels), got {image_shape}")
    height, width = int(image_shape[0]), int(image_shape[1])
    if height % patch_size or width % patch_size:
        raise DlpipeError(
            f"vit: a {height}x{width} image does not split into {patch_size}x{patch_size} "
            f"patches; pick a patch_size that divides both sides or resize the images "
            f"(data.image_size, e.g. [{max(height // patch_size, 1) * patch_size}, "
            f"{max(width // patch_size, 1) * patch_size}])"
        )
    return height // patch_size, width // patch_size


def sequence_length(image_shape: tuple[int, ...], patch_size: int) -> int:
    """Tokens the encoder sees: the [cls] token plus ``(H/p) * (W/p)`` patches."""
    rows, cols = patch_grid(image_shape, patch_size)
    return 1 + rows * cols


@keras.saving.register_keras_serializable(package="dlpipe")
class ClassToken(layers.Layer):
    """Puts a learned ``[cls]`` vector in front of a token sequence ``(b, N, d)``."""

    def build(self, input_shape: Any) -> None:
        self.cls = self.add_weight(shape=(1, 1, int(input_shape[-1])), initializer="zeros",
                                   name="cls")

    def call(self, tokens: Any) -> Any:
        batch = ops.shape(tokens)[0]
        cls = ops.broadcast_to(ops.cast(self.cls, tokens.dtype), (batch, 1, tokens.shape[-1]))
        return ops.concatenate([cls, tokens], axis=1)

    def compute_output_shape(self, input_shape: Any) -> Any:
        length = None if input_shape[1] is None else input_shape[1] + 1
        return (input_shape[0], length, input_shape[2])


@keras.saving.register_keras_serializable(package="dlpipe")
class LearnedPositions(layers.Layer):
    """Adds one learned vector per position: a ``(length, d)`` table."""

    def build(self, input_shape: Any) -> None:
        self.table = self.add_weight(
            shape=(int(input_shape[1]), int(input_shape[2])),
            initializer=keras.initializers.TruncatedNormal(stddev=0.02),
            name="positions",
        )

    def call(self, tokens: Any) -> Any:
        return tokens + ops.cast(self.table, tokens.dtype)[None]


@keras.saving.register_keras_serializable(package="dlpipe")
class ViTBlock(layers.Layer):
    """Pre-LayerNorm encoder block: ``x + MHSA(LN(x))``, then ``x + MLP(LN(x))``.

    Returns ``(x, attention weights (b, heads, T, T))``.
    """

    def __init__(self, d_model: int, num_heads: int, mlp_dim: int, dropout: float = 0.0,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.d_model, self.num_heads, self.mlp_dim, self.dropout_rate = (
            d_model, num_heads, mlp_dim, dropout)
        self.norm1 = layers.LayerNormalization(epsilon=1e-6, name="norm1")
        self.attention = MultiHeadAttention(num_heads, d_model, name="attention")
        self.norm2 = layers.LayerNormalization(epsilon=1e-6, name="norm2")
        self.mlp_in = layers.Dense(mlp_dim, activation="gelu", name="mlp_in")
        self.mlp_out = layers.Dense(d_model, name="mlp_out")
        self.attention_dropout = layers.Dropout(dropout)
        self.mlp_dropout = layers.Dropout(dropout)

    def build(self, input_shape: Any) -> None:
        self.norm1.build(input_shape)
        self.attention.build(input_shape)
        self.norm2.build(input_shape)
        self.mlp_in.build(input_shape)
        self.mlp_out.build((*input_shape[:-1], self.mlp_dim))
        self.built = True

    def call(self, x: Any, training: bool | None = None) -> tuple[Any, Any]:
        h = self.norm1(x)
        attended, weights = self.attention(h, h)
        x = x + self.attention_dropout(attended, training=training)
        h = self.mlp_out(self.mlp_in(self.norm2(x)))
        x = x + self.mlp_dropout(h, training=training)
        return x, weights

    def compute_output_shape(self, input_shape: Any) -> Any:
        length = input_shape[1]
        return input_shape, (input_shape[0], self.num_heads, length, length)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "d_model": self.d_model, "num_heads": self.num_heads,
                "mlp_dim": self.mlp_dim, "dropout": self.dropout_rate}


@keras.saving.register_keras_serializable(package="dlpipe")
class SelectToken(layers.Layer):
    """``x[:, index]``: one token's vector out of a sequence ``(b, T, d)``."""

    def __init__(self, index: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.index = index

    def call(self, x: Any) -> Any:
        return x[:, self.index]

    def compute_output_shape(self, input_shape: Any) -> Any:
        return (input_shape[0], input_shape[2])

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "index": self.index}


def build(params: ViTParams, data: DataBundle) -> keras.Model:
    """The registered builder: an uncompiled ViT for ``data``'s images."""
    input_shape = tuple(int(d) for d in data.input_shape)
    rows, cols = patch_grid(input_shape, params.patch_size)
    classes = int(data.num_classes or 0)
    if classes < 2:
        raise DlpipeError(f"vit: a classifier needs at least 2 classes, got {classes}")
    d = params.d_model

    inputs = keras.Input(shape=input_shape, name="image")
    x = layers.Conv2D(d, params.patch_size, strides=params.patch_size, padding="valid",
                      name="patch_embedding")(inputs)
    x = layers.Reshape((rows * cols, d), name="patch_tokens")(x)
    x = ClassToken(name="cls_token")(x)
    x = LearnedPositions(name="positions")(x)
    x = layers.Dropout(params.dropout, name="embedding_dropout")(x)
    for i in range(params.depth):
        x, _ = ViTBlock(d, params.num_heads, params.mlp_dim, params.dropout,
                        name=f"block_{i}")(x)
    x = layers.LayerNormalization(epsilon=1e-6, name="final_norm")(x)
    x = SelectToken(0, name="cls_output")(x)
    if params.head_dropout > 0:
        x = layers.Dropout(params.head_dropout, name="head_dropout")(x)
    outputs = layers.Dense(classes, activation="softmax", dtype="float32", name="probs")(x)
    return keras.Model(inputs, outputs, name="vit")


def cls_attention(model: keras.Model, images: np.ndarray) -> np.ndarray:
    """The last block's [cls] attention over the patches, mean of the heads:
    ``(n, rows, cols)``."""
    blocks = [layer for layer in model.layers if isinstance(layer, ViTBlock)]
    probe = keras.Model(model.inputs, blocks[-1].output[1])
    weights = np.asarray(probe.predict(images, verbose=0))  # (n, heads, T, T)
    cls_row = weights.mean(axis=1)[:, 0, 1:]  # [cls] query, patch keys
    grid = model.get_layer("patch_embedding").output.shape[1:3]
    return cls_row.reshape(len(images), int(grid[0]), int(grid[1]))
