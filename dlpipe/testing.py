"""A shared test harness for architecture plugins (imports Keras when used).

``check_architecture(entry)`` builds a registered model from its ``example_params`` on
small synthetic data, trains one step through the same compile path as the train
stage, and checks the output shape. dlpipe's conformance test runs it for every
registered architecture; plugin authors can call it from their own tests::

    from dlpipe.plugins import load_plugins
    from dlpipe.testing import check_architecture

    def test_my_model():
        host = load_plugins(plugin_dirs=["plugins"], entry_points=False)
        check_architecture(host.registry.models["my_model"])
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from dlpipe.data import DataBundle


def synthetic_bundle(
    task: str, n: int = 32, shape: tuple[int, ...] = (8, 8, 1), num_classes: int = 10, seed: int = 0
) -> DataBundle:
    """Random data in [0, 1] with integer labels, for every split."""
    rng = np.random.default_rng(seed)
    x = {s: rng.random((n, *shape)).astype("float32") for s in ("train", "val", "test")}
    y: dict[str, Any] = {
        s: rng.integers(0, num_classes, n).astype("int32") for s in ("train", "val", "test")
    }
    return DataBundle(
        x=x,
        y=y,
        task=task,
        num_classes=num_classes,
        class_names=[str(i) for i in range(num_classes)],
        name="synthetic",
    )


def expected_output_shape(task: str, data: DataBundle, batch: int) -> tuple[int, ...] | None:
    if task == "classification":
        return (batch, int(data.num_classes or 0))
    if task == "segmentation":  # per-pixel class probabilities
        return (batch, *data.input_shape[:2], int(data.num_classes or 0))
    if task in ("generative", "autoencoder", "reconstruction"):
        return (batch, *data.input_shape)
    return None


def check_architecture(entry: Any, data: DataBundle | None = None, batch_size: int = 8) -> Any:
    """Build, train one step, predict; return the model. Raises AssertionError on failure."""
    import keras

    from dlpipe.stages.train import default_loss

    params = entry.params.model_validate(dict(entry.example_params or {}))
    if data is None and entry.example_data is not None:
        from dlpipe.plugins import resolve_ref

        data = resolve_ref(entry.example_data, f"example_data of {entry.name}")()
    data = data or synthetic_bundle(entry.task)
    keras.utils.set_random_seed(0)
    from dlpipe.stages.model import wants_context

    build = entry.builder()
    model = build(params, data, None) if wants_context(build) else build(params, data)
    assert isinstance(model, keras.Model), f"{entry.name}: build must return a keras.Model"
    own_loss = bool(getattr(model, "term_weights", None))
    loss, metrics = (None, []) if own_loss else default_loss(entry.task)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss, metrics=metrics or None)
    if own_loss:
        assert set(model.term_weights) == set(entry.loss_terms), (
            f"{entry.name}: term_weights {sorted(model.term_weights)} do not match the "
            f"registered loss_terms {sorted(entry.loss_terms)}"
        )
    history = model.fit(
        data.dataset("train", batch_size), epochs=1, steps_per_epoch=1, verbose=0, shuffle=False
    )
    losses = {k: v[-1] for k, v in history.history.items() if "loss" in k}
    assert losses, f"{entry.name}: training reported no loss"
    for key, value in losses.items():
        assert math.isfinite(float(value)), f"{entry.name}: {key} is {value} after one step"
    x = data.x["test"][:batch_size]
    out = model.predict(x, verbose=0)
    first = out[0] if isinstance(out, (list, tuple)) else out
    expected = expected_output_shape(entry.task, data, len(x))
    if expected is not None:
        assert tuple(np.shape(first)) == expected, (
            f"{entry.name}: output shape {np.shape(first)}, expected {expected}"
        )
    else:
        assert np.shape(first)[0] == len(x), f"{entry.name}: batch dimension changed"
    if callable(getattr(model, "generate_samples", None)):
        samples = np.asarray(model.generate_samples(3, seed=0))
        assert samples.shape == (3, *data.input_shape), (
            f"{entry.name}: generate_samples gave {samples.shape}, expected "
            f"{(3, *data.input_shape)}"
        )
        assert np.all(np.isfinite(samples)), f"{entry.name}: generate_samples is not finite"
    return model
