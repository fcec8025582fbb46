"""The ``sample_quality`` evaluate stage: how convincing a generative model's samples are.

The Inception score and FID judge samples with an ImageNet Inception network, which
needs downloaded weights and large RGB images. This stage keeps both ideas but uses a
judge trained on the pipeline's own *labelled* data (digits, shapes, ...), so it works
offline and on 16x16 grey images:

1. **The judge.** A small classifier (a few stride-2 conv blocks, or dense layers for
   non-image data, then a ``features`` layer and a softmax) is trained on the
   training split once per dataset and cached as
   ``<DLPIPE_HOME>/quality_classifiers/<key>.keras``. The key holds the dataset's
   name, the sample shape, the value range and a hash of the training arrays and of
   the judge's settings, so a second run on the same data reuses it (and says so),
   and different data or settings never do. Its accuracy on the held-out split is
   logged: scores from a poor judge mean little.
2. **The samples.** ``model.generate_samples(n, labels=None, seed=...)`` returns ``n``
   images in the data's value range; every generative model in dlpipe provides it. A
   conditional model (``model.conditional`` true) is asked for balanced labels
   ``0, 1, ..., K-1, 0, ...``. Samples are clipped to the value range.
3. **The scores** (pure NumPy, below), for the generated samples and, as a reference,
   for the held-out real images:

   * ``confidence``: the mean of the judge's top softmax probability. Recognisable
     samples score high; blurry in-between samples score low.
   * ``coverage``: the share of the ``K`` classes that at least ``coverage_share``
     (default ``1/(2K)``, half of a uniform share) of the samples are classified as.
     A GAN that collapsed onto a few modes covers few classes.
   * ``inception_score``: ``exp(E_x[KL(p(y|x) || p(y))])`` with the judge in place
     of Inception: between 1 and ``K``; high when every sample is confidently one
     class *and* the classes are spread evenly.
   * ``frechet``: the Fréchet distance between Gaussians fitted to the judge's
     penultimate-layer features (FID's formula, not its network):
     ``||mu_a - mu_b||^2 + Tr(C_a + C_b - 2 (C_a C_b)^(1/2))``. Generated samples are
     compared with the held-out split, the held-out split with the training split;
     the latter is the floor to compare with (small, not zero: finite samples).
   * for conditional models, ``label_accuracy``: the share of samples the judge
     classifies as the label they were generated for.

Metrics are logged once (``step=None``) as ``quality_<set>_<score>`` with ``<set>``
``generated`` or ``real``, plus ``quality_classifier_accuracy``. Plots:
``quality_classes.png`` (the share of each predicted class, generated vs real) and,
for images, ``quality_samples.png`` (the samples the judge is most and least sure of).

Unlike FID numbers in papers, these are comparable only between runs that use the same
judge (same data and judge settings) and the same sample counts.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from dlpipe import paths
from dlpipe.errors import DlpipeError
from dlpipe.models.grids import labels_of, value_range_of

# --------------------------------------------------------------------------------------
# The scores: small pure-NumPy functions
# --------------------------------------------------------------------------------------


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric positive semi-definite matrix.

    Through an eigen-decomposition: real by construction, with round-off negative
    eigenvalues clipped to 0 (no complex parts to discard, unlike a general sqrtm).
    """
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of ``(n, d)`` features, in float64."""
    feats = np.asarray(features, dtype="float64")
    if feats.ndim != 2 or len(feats) < 2:
        raise ValueError(f"need (n >= 2, d) features, got shape {feats.shape}")
    return feats.mean(axis=0), np.atleast_2d(np.cov(feats, rowvar=False))


def frechet_distance_from_stats(
    mu_a: np.ndarray, cov_a: np.ndarray, mu_b: np.ndarray, cov_b: np.ndarray
) -> float:
    """``||mu_a - mu_b||^2 + Tr(C_a + C_b - 2 (C_a C_b)^(1/2))``.

    ``Tr((C_a C_b)^(1/2))`` is computed as ``Tr((S C_b S)^(1/2))`` with ``S = C_a^(1/2)``:
    the two matrices are similar (same eigenvalues), and the second is symmetric PSD,
    so its eigenvalues are real and non-negative up to round-off.
    """
    root_a = _psd_sqrt(cov_a)
    middle = root_a @ cov_b @ root_a
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2.0)
    trace_sqrt = float(np.sum(np.sqrt(np.clip(eigenvalues, 0.0, None))))
    diff = np.asarray(mu_a, dtype="float64") - np.asarray(mu_b, dtype="float64")
    value = float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt)
    return max(value, 0.0)  # round-off can make a distance of ~0 slightly negative


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """The Fréchet distance between Gaussians fitted to two ``(n, d)`` feature sets."""
    return frechet_distance_from_stats(*gaussian_stats(feats_a), *gaussian_stats(feats_b))


def confidence_and_coverage(
    probs: np.ndarray, min_share: float | None = None
) -> tuple[float, float]:
    """``(mean top probability, share of classes covered)`` of ``(n, K)`` probabilities.

    A class is covered when at least ``min_share`` of the rows are classified as it
    (their argmax); ``None`` means ``1 / (2K)``.
    """
    p = np.asarray(probs, dtype="float64")
    if p.ndim != 2 or len(p) == 0:
        raise ValueError(f"need (n >= 1, classes) probabilities, got shape {p.shape}")
    k = p.shape[1]
    threshold = 1.0 / (2 * k) if min_share is None else float(min_share)
    shares = np.bincount(p.argmax(axis=1), minlength=k) / len(p)
    return float(p.max(axis=1).mean()), float(np.mean(shares >= threshold))


def inception_score(probs: np.ndarray, eps: float = 1e-12) -> float:
    """``exp(mean_i KL(p(y|x_i) || p(y)))`` with ``p(y)`` the mean of the rows.

    1 when every row is the same distribution; ``K`` when each row is one-hot and
    the classes are used equally often.
    """
    p = np.clip(np.asarray(probs, dtype="float64"), eps, 1.0)
    p = p / p.sum(axis=1, keepdims=True)
    marginal = p.mean(axis=0, keepdims=True)
    kl = np.sum(p * (np.log(p) - np.log(marginal)), axis=1)
    return float(np.exp(kl.mean()))


def class_shares(probs: np.ndarray) -> np.ndarray:
    """The share of rows classified as each class."""
    p = np.asarray(probs)
    return np.bincount(p.argmax(axis=1), minlength=p.shape[1]) / max(len(p), 1)


def set_scores(
    probs: np.ndarray,
    features: np.ndarray,
    reference: np.ndarray,
    min_share: float | None = None,
) -> dict[str, float]:
    """Every score of one set: its probabilities, its features, reference features."""
    confidence, coverage = confidence_and_coverage(probs, min_share)
    return {
        "confidence": confidence,
        "coverage": coverage,
        "inception_score": inception_score(probs),
        "frechet": frechet_distance(features, reference),
    }


# --------------------------------------------------------------------------------------
# The judge: a small classifier, cached per dataset
# --------------------------------------------------------------------------------------


def classifier_key(data: Any, settings: dict[str, Any]) -> str:
    """``<name>-<h>x<w>x<c>-range<low>_<high>-<hash>``: what the cached judge was trained on.

    The hash covers the training arrays (values, shapes, dtypes) and the judge's
    ``settings``, so other data or settings never reuse it.
    """
    x = np.ascontiguousarray(data.x["train"])
    y = np.ascontiguousarray(data.y["train"])
    digest = hashlib.sha256()
    for array in (x, y):
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(array.tobytes())
    digest.update(json.dumps(settings, sort_keys=True).encode())
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(data.name)).strip("-") or "data"
    shape = "x".join(str(d) for d in data.input_shape)
    low, high = value_range_of(data)
    return f"{name}-{shape}-range{low:g}_{high:g}-{digest.hexdigest()[:16]}"


def build_classifier(input_shape: tuple[int, ...], num_classes: int, settings: Any) -> Any:
    """The judge: conv blocks (images) or dense layers, ``features``, then a softmax.

    Every layer computes in float32 whatever the run's dtype policy, so one cached
    judge serves float32 and mixed-precision runs alike.
    """
    import keras
    from keras import layers

    f32 = "float32"
    inputs = keras.Input(shape=input_shape, name="image")
    h = inputs
    if len(input_shape) == 3:
        for i, filters in enumerate(settings.filters):
            h = layers.Conv2D(
                filters, 3, padding="same", activation="relu", dtype=f32, name=f"conv_{i}a"
            )(h)
            h = layers.Conv2D(
                filters,
                3,
                strides=2,
                padding="same",
                activation="relu",
                dtype=f32,
                name=f"conv_{i}b",
            )(h)
        if h.shape[1] * h.shape[2] * h.shape[3] > 4096:  # large maps: average positions
            h = layers.GlobalAveragePooling2D(dtype=f32, name="pool")(h)
        else:  # small ones keep where things are, which matters for digits
            h = layers.Flatten(dtype=f32, name="flatten")(h)
    else:
        h = layers.Flatten(dtype=f32, name="flatten")(h)
        for i, units in enumerate(settings.filters):
            h = layers.Dense(units, activation="relu", dtype=f32, name=f"dense_{i}")(h)
    features = layers.Dense(settings.features, activation="relu", dtype=f32, name="features")(h)
    h = layers.Dropout(settings.dropout, dtype=f32, name="dropout")(features)
    probs = layers.Dense(num_classes, activation="softmax", dtype=f32, name="probs")(h)
    return keras.Model(inputs, probs, name="quality_classifier", dtype=f32)


def quality_classifier(
    data: Any, settings: Any, seed: int = 0, cache_dir: Path | None = None
) -> tuple[Any, bool, Path]:
    """``(classifier, trained, path)``: the cached judge for ``data``, trained if needed.

    ``trained`` is False when the cached file was reused. ``settings`` is a
    :class:`dlpipe.stages.reports.QualityClassifierParams`; ``settings.retrain``
    forces training. Training reseeds Keras' random generators with ``seed``.
    """
    import keras

    config = settings.model_dump(exclude={"retrain"})
    folder = Path(cache_dir) if cache_dir is not None else paths.home() / "quality_classifiers"
    path = folder / f"{classifier_key(data, config)}.keras"
    if path.exists() and not settings.retrain:
        try:
            return keras.saving.load_model(path, compile=False), False, path
        except Exception as exc:  # noqa: BLE001 - a truncated or foreign file: train anew
            print(f"sample_quality: cannot load the cached judge {path} ({exc}); retraining")

    keras.utils.set_random_seed(seed)
    x = np.asarray(data.x["train"], dtype="float32")
    y = np.asarray(labels_of(data, "train")).reshape(-1).astype("int32")
    classifier = build_classifier(tuple(data.input_shape), int(data.num_classes), settings)
    classifier.compile(
        optimizer=keras.optimizers.Adam(settings.learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    classifier.fit(
        x, y, batch_size=settings.batch_size, epochs=settings.epochs, shuffle=True, verbose=0
    )
    folder.mkdir(parents=True, exist_ok=True)
    # Written next to its final name, then renamed: a concurrent run never reads half a
    # file (the .keras suffix is what Keras' save wants).
    partial = folder / f".{path.stem}.{os.getpid()}.partial.keras"
    classifier.save(partial)
    os.replace(partial, path)
    return classifier, True, path


def judge(classifier: Any, x: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(probabilities, features)`` of ``x``: the softmax and the penultimate layer."""
    import keras

    from dlpipe.models import grids

    both = keras.Model(
        classifier.inputs[0], [classifier.output, classifier.get_layer("features").output]
    )
    # Called batch by batch (no predict(): no tf.function traced for a one-off model).
    probs, feats = grids.predict_batches(
        lambda batch: both(batch, training=False), np.asarray(x, dtype="float32"), batch_size
    )
    return np.asarray(probs, dtype="float64"), np.asarray(feats, dtype="float64")


# --------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------


def class_shares_figure(
    generated: np.ndarray, real: np.ndarray, names: list[str], min_share: float
) -> Any:
    """Bars: the share of samples classified as each class, generated vs real."""
    from dlpipe.models import grids

    k = len(generated)
    fig = grids.figure(max(4.0, 0.5 * k + 1.5), 3.2)
    ax = fig.subplots()
    positions = np.arange(k)
    ax.bar(positions - 0.2, real, width=0.4, label="real (held out)", color="tab:gray")
    ax.bar(positions + 0.2, generated, width=0.4, label="generated", color="tab:blue")
    ax.axhline(min_share, ls="--", lw=1, color="tab:red", label="coverage threshold")
    ax.set_xticks(positions, names, fontsize=7)
    ax.set_ylabel("share of samples")
    ax.set_title("classes the judge sees", fontsize=9)
    ax.legend(fontsize=7)
    return fig


def extremes_figure(samples: np.ndarray, probs: np.ndarray, value_range: Any, cols: int = 8) -> Any:
    """Two rows: the samples the judge is most sure of, and those it is least sure of."""
    from dlpipe.models import grids

    order = np.argsort(-probs.max(axis=1), kind="stable")
    cols = max(1, min(cols, len(samples) // 2))
    chosen = np.concatenate([order[:cols], order[::-1][:cols]])
    return grids.grid_figure(
        samples[chosen],
        value_range,
        cols,
        title="generated samples by the judge's confidence",
        row_labels=["most sure", "least sure"],
    )


# --------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------


def _check(ctx: Any, params: Any, stage: str) -> None:
    model, data = ctx.model, ctx.data
    if model is None or data is None:
        raise DlpipeError(
            f"stage {stage!r}: sample_quality needs a data stage and a trained model before it"
        )
    if not callable(getattr(model, "generate_samples", None)):
        raise DlpipeError(
            f"stage {stage!r}: model {getattr(model, 'name', type(model).__name__)!r} has no "
            "generate_samples(n, labels=None, seed=None) method; sample_quality scores "
            "generative models that provide one (gan, cgan, wgan_gp, vae, ...)"
        )
    labelled = data.y.get("train") is not None and data.y.get(params.split) is not None
    if not data.num_classes or data.num_classes < 2 or not labelled:
        raise DlpipeError(
            f"stage {stage!r}: sample_quality trains its judge on class labels, and the data "
            f"{data.name!r} has none; use a labelled data set (sklearn_digits, shapes, ...)"
        )
    if data.size(params.split) < 2:
        raise DlpipeError(
            f"stage {stage!r}: the {params.split!r} split has {data.size(params.split)} "
            "examples; sample_quality compares samples with held-out real images: set a "
            "non-zero test_fraction (or val_fraction) in the data stage, or params.split"
        )


def sample_quality(ctx: Any, params: Any) -> None:
    stage = ctx.stage.id if ctx.stage is not None else "sample_quality"
    _check(ctx, params, stage)
    model, data = ctx.model, ctx.data
    k = int(data.num_classes)
    names = [str(n) for n in data.class_names][:k] or [str(i) for i in range(k)]
    names += [str(i) for i in range(len(names), k)]
    low, high = value_range_of(data)
    min_share = params.coverage_share if params.coverage_share is not None else 1.0 / (2 * k)

    classifier, trained, path = quality_classifier(data, params.classifier, params.seed)
    if trained:
        print(
            f"sample_quality: trained a judge classifier on {data.size('train')} "
            f"{data.name!r} examples, cached at {path}"
        )
    else:
        print(f"sample_quality: reusing the cached judge classifier {path}")

    held_out = np.asarray(data.x[params.split], dtype="float32")
    y_held = np.asarray(labels_of(data, params.split)).reshape(-1).astype(int)
    real_probs, real_feats = judge(classifier, held_out, params.batch_size)
    _, train_feats = judge(classifier, data.x["train"], params.batch_size)

    conditional = bool(getattr(model, "conditional", False))
    labels = np.arange(params.num_samples) % k if conditional else None
    samples = np.asarray(
        model.generate_samples(params.num_samples, labels=labels, seed=params.seed),
        dtype="float32",
    )
    if samples.shape != (params.num_samples, *data.input_shape):
        raise DlpipeError(
            f"stage {stage!r}: generate_samples returned shape {samples.shape}, expected "
            f"{(params.num_samples, *data.input_shape)}"
        )
    if not np.all(np.isfinite(samples)):
        raise DlpipeError(f"stage {stage!r}: the model generated non-finite values")
    samples = np.clip(samples, low, high)
    fake_probs, fake_feats = judge(classifier, samples, params.batch_size)

    metrics = {"quality_classifier_accuracy": float(np.mean(real_probs.argmax(axis=1) == y_held))}
    scores = {
        "generated": set_scores(fake_probs, fake_feats, real_feats, min_share),
        "real": set_scores(real_probs, real_feats, train_feats, min_share),
    }
    for which, values in scores.items():
        metrics.update({f"quality_{which}_{name}": v for name, v in values.items()})
    if labels is not None:
        metrics["quality_generated_label_accuracy"] = float(
            np.mean(fake_probs.argmax(axis=1) == labels)
        )
    ctx.log_metrics(metrics)

    print(
        f"sample_quality ({params.num_samples} samples vs {len(held_out)} held-out "
        f"{params.split!r} images; judge accuracy {metrics['quality_classifier_accuracy']:.3f}):"
    )
    print(f"  {'':<16}{'generated':>11}{'real':>11}")
    for name in ("confidence", "coverage", "inception_score", "frechet"):
        print(f"  {name:<16}{scores['generated'][name]:>11.4f}{scores['real'][name]:>11.4f}")
    if labels is not None:
        print(f"  {'label_accuracy':<16}{metrics['quality_generated_label_accuracy']:>11.4f}")

    if not params.plots:
        return
    ctx.log_figure(
        class_shares_figure(class_shares(fake_probs), class_shares(real_probs), names, min_share),
        "quality_classes.png",
    )
    if data.is_image:
        ctx.log_figure(extremes_figure(samples, fake_probs, (low, high)), "quality_samples.png")
