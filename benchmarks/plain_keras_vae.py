"""A variational autoencoder on scikit-learn's 8x8 digits, written by hand in Keras.

This is the baseline that ``bench_vae.py`` times ``dlpipe run pipelines/vae.yaml``
against: the script a user would write without dlpipe, in the style of the keras-io
example ``examples/generative/vae.py``. It does the same work as the pipeline, with
the same numbers:

* data: ``sklearn.datasets.load_digits`` as (n, 8, 8, 1) float32 images, split
  80/10/10 train/val/test with scikit-learn's ``train_test_split`` (seeded with 42 and
  43, stratified by label, indices sorted) and min-max scaled to [0, 1] with the
  training split's range;
* model: a dense VAE, encoder 64 -> 256 -> 128 -> (z_mean, z_log_var) in 2-D, decoder
  2 -> 128 -> 256 -> 64 (sigmoid); loss = binary cross-entropy summed over the pixels
  plus the KL divergence, both averaged over the batch; Adam with learning rate 3e-3;
* training: a ``tf.data`` pipeline (cache, shuffle, batch 32, prefetch), 40 epochs,
  validation on the val split, ``verbose=2``, no early stopping, no tracking;
* afterwards: the test split is evaluated and the model saved as ``vae.keras`` in the
  working directory (the pipeline does both too; ``--train-only`` skips them).

It imports nothing from dlpipe. The last line printed is ``BENCH {json}`` with
``fit_s`` (wall time of ``model.fit``), ``epoch_s`` (per-epoch seconds, on_epoch_begin
to on_epoch_end, ``time.perf_counter``), ``epoch_period_s`` (one epoch_end to the next,
so every callback's work is in it), ``epoch_cpu_s`` (CPU seconds of the whole process
over the same span) and their medians over epochs 2.. (epoch 1 includes tracing the
train and test functions).

    python benchmarks/plain_keras_vae.py            # 40 epochs
    python benchmarks/plain_keras_vae.py --epochs 5
"""

from __future__ import annotations

import time

T_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from keras import layers, ops  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

T_IMPORTED = time.perf_counter()

SEED = 42
VAL_FRACTION = 0.1
TEST_FRACTION = 0.1
LATENT_DIM = 2
HIDDEN = [256, 128]
LEARNING_RATE = 3e-3  # as in pipelines/vae.yaml


# ------------------------------------------------------------------------------ data


def load_data(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train, val and test images in [0, 1], split like the pipeline's data stage."""
    digits = load_digits()
    x = digits.images.astype("float32")[..., np.newaxis]  # (1797, 8, 8, 1), values 0..16
    y = digits.target
    index = np.arange(len(x))
    rest, test = train_test_split(index, test_size=TEST_FRACTION, random_state=seed, stratify=y)
    rest = np.sort(rest)
    train, val = train_test_split(
        rest,
        test_size=VAL_FRACTION / (1.0 - TEST_FRACTION),  # a share of all examples
        random_state=seed + 1,
        stratify=y[rest],
    )
    x_train, x_val, x_test = x[np.sort(train)], x[np.sort(val)], x[np.sort(test)]
    low, high = x_train.min(), x_train.max()
    scale = 1.0 / (high - low)
    return tuple((part - low) * scale for part in (x_train, x_val, x_test))


def make_dataset(x: np.ndarray, batch_size: int, shuffle: bool, seed: int) -> tf.data.Dataset:
    ds = tf.data.Dataset.from_tensor_slices(x).cache()
    if shuffle:
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


# ----------------------------------------------------------------------------- model


@keras.saving.register_keras_serializable(package="bench")
class Sampling(layers.Layer):
    """z = z_mean + exp(z_log_var / 2) * epsilon, epsilon ~ N(0, I)."""

    def __init__(self, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs):
        z_mean, z_log_var = inputs
        epsilon = keras.random.normal(ops.shape(z_mean), seed=self.seed_generator)
        return z_mean + ops.exp(0.5 * z_log_var) * epsilon

    def get_config(self):
        return {**super().get_config(), "seed": self.seed}


def build_encoder() -> keras.Model:
    inputs = keras.Input(shape=(8, 8, 1))
    x = layers.Flatten()(inputs)
    for units in HIDDEN:
        x = layers.Dense(units, activation="relu")(x)
    z_mean = layers.Dense(LATENT_DIM, name="z_mean")(x)
    z_log_var = layers.Dense(LATENT_DIM, name="z_log_var")(x)
    return keras.Model(inputs, [z_mean, z_log_var], name="encoder")


def build_decoder() -> keras.Model:
    latent_inputs = keras.Input(shape=(LATENT_DIM,))
    x = latent_inputs
    for units in reversed(HIDDEN):
        x = layers.Dense(units, activation="relu")(x)
    x = layers.Dense(8 * 8 * 1, activation="sigmoid")(x)
    outputs = layers.Reshape((8, 8, 1))(x)
    return keras.Model(latent_inputs, outputs, name="decoder")


@keras.saving.register_keras_serializable(package="bench")
class VAE(keras.Model):
    def __init__(self, encoder, decoder, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.encoder = encoder
        self.decoder = decoder
        self.seed = seed
        self.sampling = Sampling(seed)
        self.total_loss_tracker = keras.metrics.Mean(name="loss")
        self.reconstruction_loss_tracker = keras.metrics.Mean(name="reconstruction_loss")
        self.kl_loss_tracker = keras.metrics.Mean(name="kl_loss")

    @property
    def metrics(self):
        return [self.total_loss_tracker, self.reconstruction_loss_tracker, self.kl_loss_tracker]

    def build(self, input_shape=None):
        # The encoder and decoder are built functional models; the sampler has no weights.
        self.sampling.build([(None, LATENT_DIM), (None, LATENT_DIM)])
        self.built = True

    def call(self, inputs, training=None):
        z_mean, z_log_var = self.encoder(inputs, training=training)
        z = self.sampling((z_mean, z_log_var)) if training else z_mean
        return self.decoder(z, training=training)

    def compute_losses(self, data, training):
        z_mean, z_log_var = self.encoder(data, training=training)
        z = self.sampling((z_mean, z_log_var))
        reconstruction = self.decoder(z, training=training)
        reconstruction_loss = ops.mean(
            ops.sum(keras.losses.binary_crossentropy(data, reconstruction), axis=(1, 2))
        )
        kl_loss = -0.5 * (1 + z_log_var - ops.square(z_mean) - ops.exp(z_log_var))
        kl_loss = ops.mean(ops.sum(kl_loss, axis=1))
        return reconstruction_loss + kl_loss, reconstruction_loss, kl_loss

    def update_trackers(self, total, reconstruction, kl):
        self.total_loss_tracker.update_state(total)
        self.reconstruction_loss_tracker.update_state(reconstruction)
        self.kl_loss_tracker.update_state(kl)
        return {m.name: m.result() for m in self.metrics}

    def train_step(self, data):
        with tf.GradientTape() as tape:
            total, reconstruction, kl = self.compute_losses(data, training=True)
        grads = tape.gradient(total, self.trainable_weights)
        self.optimizer.apply_gradients(zip(grads, self.trainable_weights, strict=True))
        return self.update_trackers(total, reconstruction, kl)

    def test_step(self, data):
        return self.update_trackers(*self.compute_losses(data, training=False))

    def get_config(self):
        return {
            **super().get_config(),
            "encoder": keras.saving.serialize_keras_object(self.encoder),
            "decoder": keras.saving.serialize_keras_object(self.decoder),
            "seed": self.seed,
        }

    @classmethod
    def from_config(cls, config):
        encoder = keras.saving.deserialize_keras_object(config.pop("encoder"))
        decoder = keras.saving.deserialize_keras_object(config.pop("decoder"))
        return cls(encoder, decoder, **config)


# ------------------------------------------------------------------------- timing


class EpochTimer(keras.callbacks.Callback):
    """Seconds per epoch (begin -> end) and between consecutive epoch ends."""

    def __init__(self):
        super().__init__()
        self.epoch_s: list[float] = []
        self.period_s: list[float] = []
        self.cpu_period_s: list[float] = []  # CPU seconds of the process, all threads
        self._begin = self._last_end = self._last_cpu = None

    def on_train_begin(self, logs=None):
        self._last_end = time.perf_counter()
        self._last_cpu = time.process_time()

    def on_epoch_begin(self, epoch, logs=None):
        self._begin = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        now = time.perf_counter()
        self.epoch_s.append(now - self._begin)
        self.period_s.append(now - self._last_end)
        self._last_end = now
        cpu = time.process_time()
        self.cpu_period_s.append(cpu - self._last_cpu)
        self._last_cpu = cpu


def median_after_first(values: list[float]) -> float | None:
    """Median over epochs 2.. (epoch 1 traces the functions); all if only one."""
    rest = values[1:] or values
    return statistics.median(rest) if rest else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument(
        "--train-only", action="store_true", help="skip the test evaluation and model.save"
    )
    args = parser.parse_args()

    keras.utils.set_random_seed(args.seed)
    x_train, x_val, x_test = load_data(args.seed)
    print(f"data: {len(x_train)}/{len(x_val)}/{len(x_test)} train/val/test")
    train_ds = make_dataset(x_train, args.batch_size, shuffle=True, seed=args.seed)
    val_ds = make_dataset(x_val, args.batch_size, shuffle=False, seed=args.seed)

    vae = VAE(build_encoder(), build_decoder(), seed=args.seed)
    vae.build((None, 8, 8, 1))
    vae.compile(optimizer=keras.optimizers.Adam(learning_rate=LEARNING_RATE))

    timer = EpochTimer()
    t0 = time.perf_counter()
    vae.fit(train_ds, validation_data=val_ds, epochs=args.epochs, callbacks=[timer], verbose=2)
    fit_s = time.perf_counter() - t0

    evaluate_s = save_s = None
    if not args.train_only:
        t0 = time.perf_counter()
        results = vae.evaluate(
            make_dataset(x_test, 256, shuffle=False, seed=args.seed), return_dict=True, verbose=0
        )
        evaluate_s = time.perf_counter() - t0
        print("test: " + ", ".join(f"{k} {float(v):.4f}" for k, v in results.items()))
        t0 = time.perf_counter()
        vae.save("vae.keras")
        save_s = time.perf_counter() - t0

    report = {
        "epochs": len(timer.epoch_s),
        "batch_size": args.batch_size,
        "import_s": T_IMPORTED - T_START,
        "fit_s": fit_s,
        "epoch_s_median": median_after_first(timer.epoch_s),
        "epoch_period_s_median": median_after_first(timer.period_s),
        "epoch_cpu_s_median": median_after_first(timer.cpu_period_s),
        "evaluate_s": evaluate_s,
        "save_s": save_s,
        "script_s": time.perf_counter() - T_START,
        "epoch_s": timer.epoch_s,
        "epoch_period_s": timer.period_s,
        "epoch_cpu_s": timer.cpu_period_s,
    }
    print("BENCH " + json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
