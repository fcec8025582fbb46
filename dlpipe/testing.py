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

With ``package_to=FOLDER`` it also saves the model as the MLflow model a run logs
(:func:`dlpipe.packaging.save_model`) with the predictions of the live model on the
input example; :func:`check_fresh_process` then loads any number of such folders in
ONE new Python process, through ``mlflow.pyfunc`` only, and compares.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
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


def build_architecture(
    host: Any, name: str, data: Any, *, example_params: bool = True, seed: int | None = 0,
    **params: Any,
) -> Any:
    """Build the architecture ``name`` that ``host`` (a :class:`~dlpipe.plugins.PluginHost`)
    registered, on ``data``: its ``example_params`` (unless ``example_params=False``)
    updated with ``params``, after seeding Keras with ``seed`` (``None``: no seeding)."""
    entry = host.registry.models[name]
    if seed is not None:
        import keras

        keras.utils.set_random_seed(seed)
    merged = {**(dict(entry.example_params or {}) if example_params else {}), **params}
    return entry.builder()(entry.params.model_validate(merged), data)


def expected_output_shape(task: str, data: DataBundle, batch: int) -> tuple[int, ...] | None:
    if task == "classification":
        return (batch, int(data.num_classes or 0))
    if task == "segmentation":  # per-pixel class probabilities
        return (batch, *data.input_shape[:2], int(data.num_classes or 0))
    if task in ("generative", "autoencoder", "reconstruction"):
        return (batch, *data.input_shape)
    return None


def check_architecture(
    entry: Any,
    data: DataBundle | None = None,
    batch_size: int = 8,
    package_to: str | Path | None = None,
    export: bool = True,
) -> Any:
    """Build, train one step, predict; return the model. Raises AssertionError on failure.

    ``package_to``: also save the model there with :func:`package_model` (``export``:
    with the SavedModel export, which costs seconds per model)."""
    import keras

    from dlpipe.stages.train.fit import default_loss

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
    own_loss = bool(getattr(model, "loss_weights", None))
    loss, metrics = (None, []) if own_loss else default_loss(entry.task)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss, metrics=metrics or None)
    if own_loss:
        assert set(model.loss_weights) == set(entry.loss_weights), (
            f"{entry.name}: loss_weights {sorted(model.loss_weights)} do not match the "
            f"registered loss_weights {sorted(entry.loss_weights)}"
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
    if package_to is not None:
        package_model(entry, model, data, package_to, export=export)
    return model


#: Beside each packaged model folder: the live model's predictions on its input example.
EXPECTED_SUFFIX = ".expected.npz"


def package_model(
    entry: Any, model: Any, data: DataBundle, folder: str | Path, export: bool = True
) -> Path:
    """Save ``model`` as the MLflow model a run logs (with the SavedModel export unless
    ``export`` is false) and write the live model's predictions for the input example
    beside the folder."""
    from dlpipe import packaging

    folder = Path(folder)
    packaging.save_model(model, data, folder, entry, export=export)
    meta = packaging.read_meta(folder)
    params = packaging.signature_params(meta)
    example = packaging.example_inputs(model, data, meta)
    expected = packaging.predict(model, meta, example, params)
    assert sorted(expected) == meta["outputs"], f"{entry.name}: outputs {sorted(expected)}"
    for key, value in expected.items():
        assert len(value) == len(example), f"{entry.name}: {key} has {len(value)} rows"
    arrays: dict[str, Any] = {"input": example, **{f"output.{k}": v for k, v in expected.items()}}
    np.savez(str(folder) + EXPECTED_SUFFIX, **arrays)
    return folder


def check_fresh_process(folders: list[str | Path], timeout: float = 600) -> dict[str, Any]:
    """Load every packaged folder (see :func:`package_model`) in one new Python process
    that imports none of dlpipe's model modules itself: ``mlflow.pyfunc.load_model``,
    predict on the input example, compare with the live model's predictions; and the
    SavedModel where there is one. Returns ``{folder name: report}``; raises
    AssertionError listing every folder that failed."""
    code = "import sys; from dlpipe.testing import _fresh_main; sys.exit(_fresh_main(sys.argv[1:]))"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(
        [sys.executable, "-c", code, *map(str, folders)],
        capture_output=True, text=True, timeout=timeout, env=env,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0 and lines, (
        f"the fresh process failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n"
        f"{done.stderr[-3000:]}"
    )
    reports: dict[str, Any] = json.loads(lines[-1])
    failed = {name: r["error"] for name, r in reports.items() if r.get("error")}
    assert not failed, "loading in a fresh process failed:\n" + "\n".join(
        f"  {name}: {error}" for name, error in sorted(failed.items())
    )
    return reports


def _fresh_main(folders: list[str]) -> int:
    """The fresh process of :func:`check_fresh_process` (prints one JSON line)."""
    leaked = sorted(m for m in sys.modules if m.startswith("dlpipe.models."))
    if leaked:
        print(json.dumps({"(setup)": {"error": f"model modules imported early: {leaked}"}}))
        return 0
    import mlflow.pyfunc

    from dlpipe.packaging import signature_params

    reports: dict[str, Any] = {}
    for folder in folders:
        report: dict[str, Any] = {}
        reports[Path(folder).name] = report
        try:
            with np.load(folder + EXPECTED_SUFFIX, allow_pickle=True) as saved:
                example = saved["input"]
                expected = {k.partition(".")[2]: saved[k] for k in saved.files
                            if k.startswith("output.")}
            meta = json.loads((Path(folder) / "dlpipe.json").read_text())
            model = mlflow.pyfunc.load_model(folder)
            params = signature_params(meta)
            got = model.predict(example, params=params) if params else model.predict(example)
            report["pyfunc"] = _compare(expected, got)
            report["saved_model"] = _check_saved_model(Path(folder), meta, example, expected)
        except Exception as exc:  # reported per folder
            report["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
    print(json.dumps(reports))
    return 0


def _compare(expected: dict[str, np.ndarray], got: Any) -> str:
    assert isinstance(got, dict), f"predict returned {type(got).__name__}, not a dict"
    assert sorted(got) == sorted(expected), f"outputs {sorted(got)}, expected {sorted(expected)}"
    for key, want in expected.items():
        have = np.asarray(got[key])
        assert have.shape == want.shape, f"{key}: shape {have.shape}, expected {want.shape}"
        if want.dtype.kind in "fc":
            assert np.allclose(have, want, rtol=1e-4, atol=1e-5), (
                f"{key}: differs by up to {float(np.max(np.abs(have - want))):.3g}")
        else:
            assert (have == want).all(), f"{key}: {have.tolist()} != {want.tolist()}"
    return "ok"


#: Modes whose SavedModel endpoint returns one of predict's outputs, and which.
_SAVED_MODEL_OUTPUT = {
    "classify": "probabilities", "classify_text": "probabilities",
    "segment": "probabilities", "reconstruct": "reconstruction", "upscale": "image",
    "embed": "image_embedding",
}


def _check_saved_model(folder: Path, meta: dict[str, Any], example: np.ndarray,
                       expected: dict[str, np.ndarray]) -> str:
    if meta.get("exports", {}).get("saved_model") != "ok":
        return "not exported"
    import tensorflow as tf

    loaded = tf.saved_model.load(str(folder / "saved_model"))
    key = _SAVED_MODEL_OUTPUT.get(str(meta.get("mode")))
    if key is None or example.dtype.kind not in "fiu":
        return "loads"
    dtype = tf.int32 if example.dtype.kind in "iu" else tf.float32
    out = loaded.serve(tf.constant(example, dtype=dtype))
    have = np.asarray(out[0] if isinstance(out, (list, tuple)) else out)
    assert np.allclose(have, expected[key], rtol=1e-3, atol=1e-4), (
        f"saved_model: {key} differs by up to "
        f"{float(np.max(np.abs(have - expected[key]))):.3g}")
    return "ok"
