"""A conditional variational autoencoder (Sohn et al., 2015) for the ``cvae`` architecture.

A VAE whose encoder and decoder both see the class label, as a one-hot vector:

* the encoder models ``q(z | x, y)``: the label is concatenated to the flattened image
  (dense) or appended to it as one constant plane per class (conv);
* the decoder models ``p(x | z, y)``: the label is concatenated to ``z``.

Because the decoder is told the class, the latent code no longer has to carry it and
is free to describe *style* (stroke width, slant, position). Sampling then works by
chosen class: draw ``z`` from the prior, pick ``y``, decode. The same ``z`` decoded
with every label gives the same "handwriting" for each digit, which is what the
``samples_by_class.png`` grid shows (one row per class, one ``z`` per column).

Everything else (the reparameterized :class:`~dlpipe.models.vae.model.Sampling` layer, the
``reconstruction`` and ``kl`` loss terms, KL warm-up, the latent traversal) is the
:class:`~dlpipe.models.vae.model.VAE`'s; :class:`CVAE` only routes labels to the networks.
Training needs labelled data: ``fit`` on ``(x, y)`` batches, where ``y`` are integer
class ids or one-hot rows. The figures are in :mod:`dlpipe.models.cvae.plots`.

``model((x, y))`` reconstructs ``x`` as class ``y`` (the latent mean, decoded).
``model(x)`` without labels conditions on an all-zero label vector ("no class"),
which the networks never saw in training: it only keeps ``predict(x)`` working.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

from dlpipe.data import DataBundle
from dlpipe.errors import ConfigError
from dlpipe.models import grids
from dlpipe.models.cvae import CVAEParams
from dlpipe.models.grids import value_range_of
from dlpipe.models.vae import model as vae


@keras.saving.register_keras_serializable(package="dlpipe")
class CVAE(vae.VAE):
    """A :class:`~dlpipe.models.vae.model.VAE` conditioned on a class label.

    :param encoder: ``[x, one_hot] -> (z_mean, z_log_var)``.
    :param decoder: ``[z, one_hot] -> x_hat``.
    :param num_classes: the number of classes (the one-hot width).

    Other arguments are :class:`~dlpipe.models.vae.model.VAE`'s.
    """

    conditional = True

    def __init__(
        self, encoder: keras.Model, decoder: keras.Model, num_classes: int, **kwargs: Any
    ) -> None:
        super().__init__(encoder, decoder, **kwargs)
        if int(num_classes) < 2:
            raise ValueError(f"a conditional VAE needs at least 2 classes, got {num_classes}")
        self.num_classes = int(num_classes)

    def one_hot(self, labels: Any, batch: Any) -> Any:
        """``(batch, num_classes)`` float32 one-hot rows from integer ids (any shape
        ``(batch,)`` / ``(batch, 1)``) or one-hot rows; ``None`` gives zeros."""
        if labels is None:
            return ops.zeros((batch, self.num_classes), dtype="float32")
        labels = ops.convert_to_tensor(labels)
        if len(labels.shape) == 2 and labels.shape[-1] == self.num_classes:
            return ops.cast(labels, "float32")
        ids = ops.reshape(ops.cast(labels, "int32"), (-1,))
        return ops.one_hot(ids, self.num_classes, dtype="float32")

    def encode(self, x: Any, labels: Any = None, training: bool | None = None) -> tuple[Any, Any]:
        """``(z_mean, z_log_var)`` of a batch of images of classes ``labels``."""
        x = ops.convert_to_tensor(x)  # the networks refuse NumPy mixed with tensors
        condition = self.one_hot(labels, ops.shape(x)[0])
        z_mean, z_log_var = self.encoder([x, condition], training=training)
        return z_mean, z_log_var

    def decode(self, z: Any, labels: Any = None, training: bool | None = None) -> Any:
        """Images of classes ``labels`` from latent vectors ``z``."""
        z = ops.convert_to_tensor(z)
        condition = self.one_hot(labels, ops.shape(z)[0])
        return self.decoder([z, condition], training=training)

    def class_labels(self, n: int, labels: Any) -> np.ndarray:
        """``n`` integer labels: ``labels`` as given (``n`` of them, or one for all);
        ``None`` cycles through the classes."""
        if labels is None:
            return np.arange(n, dtype="int32") % self.num_classes
        ids = np.asarray(labels)
        if ids.ndim == 2 and ids.shape[-1] == self.num_classes:
            ids = ids.argmax(axis=-1)
        ids = ids.astype("int32").reshape(-1)
        if len(ids) == 1:
            ids = np.full(n, ids[0], dtype="int32")
        if len(ids) != n:
            raise ValueError(f"cvae: {len(ids)} labels given for {n} samples")
        if ids.min() < 0 or ids.max() >= self.num_classes:
            raise ValueError(f"cvae: labels must be class ids in [0, {self.num_classes})")
        return ids

    def sample_grid(self, class_names: Sequence[str] = (), cols: int = 8) -> grids.SampleSet:
        """:func:`samples_by_class`, one row per class, rows labelled with the class
        names (class ids where there are fewer names)."""
        names = list(class_names)
        rows = [names[c] if c < len(names) else str(c) for c in range(self.num_classes)]
        return samples_by_class(self, cols), cols, rows

    def sample(self, n: int, seed: Any = None, labels: Any = None) -> Any:
        """Decode ``n`` prior samples as classes ``labels`` (default: cycling)."""
        seed = self.sampler.seed_generator if seed is None else seed
        z = keras.random.normal((n, self.latent_dim), seed=seed)
        return self.decode(z, self.class_labels(n, labels), training=False)

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        labels = None
        if isinstance(inputs, (tuple, list)):
            inputs, labels = inputs[0], (inputs[1] if len(inputs) > 1 else None)
        z_mean, z_log_var = self.encode(inputs, labels, training=training)
        z = self.sampler((z_mean, z_log_var)) if training else z_mean
        return self.decode(z, labels, training=training)

    def train_step(self, data: Any) -> dict[str, Any]:
        _, labels, _ = keras.utils.unpack_x_y_sample_weight(data)
        if labels is None:
            raise ValueError("cvae: training needs class labels, fit on (x, y) batches")
        return super().train_step(data)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "num_classes": self.num_classes}


def build(params: CVAEParams, data: DataBundle) -> CVAE:
    """The registered builder: a built, uncompiled :class:`CVAE` for ``data``.

    Needs labelled data (``data.num_classes >= 2``). Seeded like the VAE's builder.
    """
    input_shape = tuple(data.input_shape)
    vae.check_params(params, input_shape, value_range_of(data), arch="cvae")
    num_classes = int(getattr(data, "num_classes", 0) or 0)
    if num_classes < 2:
        raise ConfigError(
            "cvae: a conditional VAE needs class labels; the data has no num_classes "
            "(use a classification data stage, or the vae architecture)"
        )
    encoder, decoder = vae.networks(params, data, num_classes)
    model = CVAE(
        encoder,
        decoder,
        num_classes=num_classes,
        reconstruction=params.reconstruction,
        seed=int(np.random.randint(1, 2**31 - 1)),
        value_range=value_range_of(data),
        kl_warmup_epochs=params.kl_warmup_epochs,
        sample_every=params.sample_every,
        name="cvae",
    )
    model((np.zeros((1, *input_shape), "float32"), np.zeros((1,), "int32")))  # build
    return model


def samples_by_class(model: CVAE, cols: int = 8, seed: int = 0) -> np.ndarray:
    """``num_classes * cols`` images: row ``c`` is class ``c``; column ``j`` decodes
    the same latent ``z_j`` in every row (so columns share a style)."""
    z = np.random.default_rng(seed).standard_normal((cols, model.latent_dim)).astype("float32")
    z = np.tile(z, (model.num_classes, 1))
    labels = np.repeat(np.arange(model.num_classes, dtype="int32"), cols)
    images = vae.decode_batches(model, z, labels)
    return np.clip(images, *model.value_range)


#: The registered callback hook: the VAE's, whose sample grids come from
#: :meth:`CVAE.sample_grid` (one row per class).
callbacks = vae.callbacks
