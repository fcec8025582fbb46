"""Every pipeline in pipelines/ runs end to end, logs metrics and plots, and saves a
model that reloads.

Pipelines with a dedicated few-epoch test (listed in ``DEDICATED``, checked to be run
by that test file) are left to it; the rest run here with ``dlpipe run --smoke``: one
epoch of at most three batches per train stage, two trials per tuner.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dlpipe.cli import main

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
PIPELINES = sorted(p.stem for p in (REPO / "pipelines").glob("*.yaml"))

#: pipeline -> the test file that runs it for a few epochs with its own checks.
DEDICATED = {
    "csv_wine": "test_tabular_text_data.py",
    "text_topics": "test_tabular_text_data.py",
    "addition": "test_sequence_models.py",
    "arith_classifier": "test_vit_textclf.py",
    "captioning": "test_multimodal.py",
    "cgan": "test_generative_models.py",
    "clip": "test_multimodal.py",
    "cvae": "test_vae_variants.py",
    "ddpm": "test_diffusion.py",
    "digit_mlp": "test_run.py",
    "espcn": "test_superres.py",
    "gan": "test_sample_quality.py",
    "latent_diffusion": "test_diffusion.py",
    "lenet": "test_vision_models.py",
    "srgan": "test_superres.py",
    "unet": "test_segmentation.py",
    "vae": "test_run.py",
    "vit_digits": "test_vit_textclf.py",
    "xor": "test_training_options.py",
    "yolo": "test_detection.py",
}
SMOKE = [name for name in PIPELINES if name not in DEDICATED]


def test_every_pipeline_is_run_by_some_test():
    for name, test_file in DEDICATED.items():
        assert name in PIPELINES, f"{name}.yaml is gone; drop it from DEDICATED"
        text = (REPO / "tests" / test_file).read_text()
        assert '"run"' in text and name in text, f"{test_file} does not run {name}.yaml"
    assert set(SMOKE) | set(DEDICATED) == set(PIPELINES)


@pytest.mark.parametrize("name", SMOKE)
def test_pipeline_smoke_run(name, workdir, capsys):
    import keras
    from mlflow.tracking import MlflowClient

    from dlpipe.paths import default_tracking_uri

    rc = main(["run", str(REPO / "pipelines" / f"{name}.yaml"), "--smoke",
               "--plugins-dir", str(REPO / "plugins")])
    out = capsys.readouterr().out
    assert rc == 0, out[-2000:]

    client = MlflowClient(default_tracking_uri())
    runs = [r for e in client.search_experiments()
            for r in client.search_runs([e.experiment_id], "tags.`dlpipe.smoke` = 'true'")]
    top = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(top) == 1, [r.info.run_name for r in runs]
    run = top[0]
    assert run.info.status == "FINISHED" and run.info.run_name.endswith("-smoke")
    assert run.data.metrics, f"{name}: no metrics logged"

    run_dirs = list((workdir / "mlruns" / "runs").glob("*-smoke"))
    assert len(run_dirs) == 1
    pictures = list(run_dirs[0].rglob("*.png"))
    assert pictures, f"{name}: no plot or sample grid written"
    model_file = run_dirs[0] / "model" / "model.keras"
    assert model_file.is_file(), f"{name}: no model saved"
    model = keras.saving.load_model(model_file)
    assert isinstance(model, keras.Model) and model.count_params() > 0
