"""A small BLIP-style image captioner, the ``captioner`` architecture.

BLIP's caption decoder (Li et al., 2022) is a transformer decoder that reads the image
through cross-attention. Here, at toy scale:

1. the **image encoder** (:class:`dlpipe.models.clip.model.ImageEncoder`, a small CNN) turns
   the image into a grid of feature vectors, flattened into ``h' * w'`` *image tokens*
   with learned position embeddings: the decoder's memory;
2. the **caption decoder** embeds the caption so far (``START`` then the words) with
   positional encodings and runs decoder blocks
   (:class:`dlpipe.models.transformer.model.DecoderBlock`): causal self-attention over the
   caption, **cross-attention to the image tokens**, a feed-forward network;
3. a softmax over the vocabulary predicts the next token at every position.

Training uses **teacher forcing**: the decoder gets the true caption shifted right
behind ``START`` (the bundle's ``decoder_inputs``) and learns the caption ids with a
per-token cross-entropy (padding weighted 0); ``sequence_accuracy`` and
``token_accuracy`` are reported as for the other sequence models (``compile`` comes from
:class:`dlpipe.models.decoding.NextTokenModel`).

Generation is autoregressive: :meth:`Captioner.caption` decodes greedily (or with beam
search) through :func:`dlpipe.models.decoding.greedy_decode` / ``beam_search``, which
only need ``encode`` and ``decode``. ``model(images)`` (``predict``) runs greedy
decoding in the graph and returns the probabilities of the chosen tokens
``(b, caption_length, vocab)``; ``model({"images", "decoder_inputs"})`` is the
teacher-forced pass. The caption grid figure is in :mod:`dlpipe.models.captioner.plots`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import keras
import numpy as np
from keras import layers, ops

from dlpipe.models.attention import PositionalEmbedding, causal_mask
from dlpipe.models.captioner import CaptionerParams
from dlpipe.models.clip.model import ImageEncoder, check_caption_data
from dlpipe.models.decoding import NextTokenModel, beam_search, greedy_decode, greedy_loop
from dlpipe.models.transformer.model import DecoderBlock

if TYPE_CHECKING:
    from dlpipe.datasets.captions import CaptionBundle


@keras.saving.register_keras_serializable(package="dlpipe")
class Captioner(NextTokenModel):
    """Image encoder + transformer caption decoder; see the module docstring."""

    def __init__(
        self,
        image_shape: Sequence[int],
        vocab_size: int,
        caption_length: int,
        filters: Sequence[int] = (32, 64),
        d_model: int = 64,
        num_heads: int = 4,
        ff_dim: int = 128,
        decoder_layers: int = 2,
        dropout: float = 0.1,
        positional: str = "sinusoidal",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.image_shape = tuple(int(d) for d in image_shape)
        self.vocab_size, self.caption_length = int(vocab_size), int(caption_length)
        self.filters, self.d_model = [int(f) for f in filters], int(d_model)
        self.num_heads, self.ff_dim = int(num_heads), int(ff_dim)
        self.decoder_layers, self.dropout_rate, self.positional = (
            int(decoder_layers), float(dropout), positional)
        self.image_encoder = ImageEncoder(self.filters, d_model, name="image_encoder")
        self.token_embedding = PositionalEmbedding(vocab_size, caption_length, d_model,
                                                   positional, name="token_embedding")
        self.embedding_dropout = layers.Dropout(dropout)
        self.blocks = [DecoderBlock(d_model, num_heads, ff_dim, dropout, name=f"decoder_{i}")
                       for i in range(decoder_layers)]
        self.output_layer = layers.Dense(vocab_size, activation="softmax", dtype="float32",
                                         name="next_token")

    # -- the two halves (what greedy_decode / beam_search call) --------------------------
    def encode(self, images: Any, training: bool | None = None) -> Any:
        """Image tokens ``(b, tokens, d_model)``: the decoder's memory."""
        return self.image_encoder(images, training=training)

    def decode(self, memory: Any, decoder_ids: Any, training: bool | None = None
               ) -> tuple[Any, Any]:
        """Next-token probabilities ``(b, T, V)`` and the last block's cross-attention
        ``(b, heads, T, tokens)`` for decoder inputs ``(b, T)``."""
        decoder_ids = ops.cast(decoder_ids, "int32")
        y = self.embedding_dropout(self.token_embedding(decoder_ids), training=training)
        self_mask = causal_mask(ops.shape(decoder_ids)[1])
        cross = None
        for block in self.blocks:
            y, _, cross = block(y, memory, self_mask=self_mask, training=training)
        return self.output_layer(y), cross

    # -- Keras ---------------------------------------------------------------------------
    def call(self, inputs: Any, training: bool | None = None) -> Any:
        if isinstance(inputs, dict):
            memory = self.encode(inputs["images"], training=training)
            return self.decode(memory, inputs["decoder_inputs"], training=training)[0]
        if isinstance(inputs, (list, tuple)):
            memory = self.encode(inputs[0], training=training)
            return self.decode(memory, inputs[1], training=training)[0]
        return self.greedy_probabilities(inputs)

    def greedy_probabilities(self, images: Any) -> Any:
        """In-graph greedy decoding: ``(b, caption_length, V)`` probabilities of the
        greedily chosen tokens (``argmax`` gives the caption ids)."""
        memory = self.encode(images, training=False)
        return greedy_loop(
            lambda ids: self.decode(memory, ids, training=False)[0],
            ops.shape(images)[0],
            self.caption_length,
        )

    def build(self, input_shape: Any = None) -> None:
        if self.built:
            return
        memory = self.encode(ops.zeros((1, *self.image_shape)))
        self.decode(memory, ops.ones((1, self.caption_length), dtype="int32"))
        self.built = True

    # -- generation ----------------------------------------------------------------------
    def caption(self, images: np.ndarray, beam_width: int = 0, batch_size: int = 128
                ) -> np.ndarray:
        """Caption ids ``(n, caption_length)`` (``END`` then padding) for ``images``:
        greedy decoding, or beam search when ``beam_width > 1``."""
        images = np.asarray(images, dtype=np.float32)
        driver = _ImagesByIndex(self, images)
        index = np.arange(len(images), dtype=np.int32)[:, None]
        if beam_width > 1:
            return beam_search(driver, index, beam_width=beam_width, batch_size=batch_size)
        return greedy_decode(driver, index, batch_size=batch_size)

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "image_shape": list(self.image_shape), "vocab_size": self.vocab_size,
            "caption_length": self.caption_length, "filters": self.filters,
            "d_model": self.d_model, "num_heads": self.num_heads, "ff_dim": self.ff_dim,
            "decoder_layers": self.decoder_layers, "dropout": self.dropout_rate,
            "positional": self.positional,
        }


class _ImagesByIndex:
    """Lets the token-id decoders of :mod:`dlpipe.models.decoding` drive a captioner.

    Those decoders take ``encoder_ids`` as int arrays (and repeat rows for beams); here
    each "source" row is ``[i]``, the index of an image, which :meth:`encode` looks up.
    """

    def __init__(self, model: Captioner, images: np.ndarray) -> None:
        self.model = model
        self.images = images
        self.target_length = model.caption_length

    def encode(self, index: np.ndarray, training: bool | None = None) -> Any:
        return self.model.encode(self.images[np.asarray(index)[:, 0]], training=False)

    def decode(self, memory: Any, index: Any, decoder_ids: Any, training: bool | None = None
               ) -> tuple[Any, Any]:
        return self.model.decode(memory, decoder_ids, training=False)


def build(params: CaptionerParams, data: CaptionBundle) -> Captioner:
    """The registered builder: a built, uncompiled :class:`Captioner` for caption data."""
    check_caption_data("captioner", data)
    assert data.vocab is not None  # checked above
    model = Captioner(
        image_shape=data.input_shape,
        vocab_size=data.vocab.size,
        caption_length=data.caption_length,
        filters=params.filters,
        d_model=params.d_model,
        num_heads=params.num_heads,
        ff_dim=params.ff_dim,
        decoder_layers=params.decoder_layers,
        dropout=params.dropout,
        positional=params.positional,
        name="captioner",
    )
    model.build()
    return model

