"""The command line: import weight, exit codes, validate, schema, ui, help."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import textwrap

import pytest

from dlpipe.cli import main, ui_command

HEAVY = ("tensorflow", "keras", "mlflow", "optuna", "matplotlib")


def run_python(code: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "argv",
    [
        None,
        ["--help"],
        ["validate", "pipelines/vae.yaml"],
        ["validate", "pipelines/digit_mlp.yaml"],
        ["plugins"],
        ["schema"],
        ["runs", "--help"],
        ["compare", "--help"],
        ["predict", "--help"],
        ["serve", "--help"],
    ],
)
def test_light_commands_do_not_import_tensorflow(repo, argv):
    code = f"""
        import sys
        import dlpipe
        from dlpipe.cli import main
        argv = {argv!r}
        if argv is not None:
            try:
                rc = main(argv)
            except SystemExit as exc:
                rc = exc.code
            assert rc == 0, rc
        heavy = [m for m in {HEAVY!r} if m in sys.modules]
        assert not heavy, heavy
        print("light")
    """
    result = run_python(code, repo)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("light")


@pytest.mark.parametrize(
    ("command", "example"),
    [
        ("runs", 'dlpipe runs --filter "metrics.test_accuracy > 0.9"'),
        ("compare", "dlpipe compare xor xor-smoke -o curves.png"),
        ("predict", "dlpipe predict 38adba6d pipelines/xor.yaml"),
        ("serve", "dlpipe serve models:/digits@champion --port 8080"),
    ],
)
def test_new_commands_have_examples_in_their_help(command, example, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and example in out and "--tracking-uri" in out


def test_python_dash_m(repo):
    result = subprocess.run(
        [sys.executable, "-m", "dlpipe", "--help"], cwd=repo, capture_output=True, text=True
    )
    assert result.returncode == 0 and "dlpipe run pipelines/vae.yaml" in result.stdout


def test_bad_spec_exits_2_without_traceback(tmp_path, capsys):
    spec = tmp_path / "bad.yaml"
    spec.write_text("name: b\nstages:\n  - kind: data\n    use: sklearn_digit\n")
    assert main(["validate", str(spec)]) == 2
    err = capsys.readouterr().err
    assert f"{spec}:4:5: stages[0].use (data): unknown data stage 'sklearn_digit'" in err
    assert "did you mean: sklearn_digits" in err and "Traceback" not in err
    assert main(["run", str(spec)]) == 2


def test_missing_spec_file_suggests(tmp_path, capsys, repo):
    assert main(["validate", str(repo / "pipelines" / "vea.yaml")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "vae.yaml" in err


def test_debug_shows_the_traceback(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text("name: [\n")
    result = subprocess.run(
        [sys.executable, "-m", "dlpipe", "--debug", "validate", str(spec)],
        capture_output=True, text=True,
    )
    assert result.returncode != 0 and "Traceback" in result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "dlpipe", "validate", str(spec)], capture_output=True, text=True
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "bad.yaml:2:1: <top level>: invalid YAML" in result.stderr


def test_validate_reports_overrides(repo, capsys):
    assert main(["validate", str(repo / "pipelines" / "vae.yaml"), "--set", "train.epochs=0"]) == 2
    err = capsys.readouterr().err
    assert "--set train.epochs=0: stages[2].params.epochs (train.epochs)" in err
    assert "a number >= 1" in err


def test_schema_lists_every_stage_and_validates(repo, capsys, tmp_path):
    import yaml

    out = tmp_path / "schema.json"
    assert main(["schema", "-o", str(out)]) == 0
    schema = json.loads(out.read_text())
    titles = {rule["then"].get("title") for rule in schema["properties"]["stages"]["items"]["allOf"]}
    assert {"data: sklearn_digits", "model: vae", "train: keras_fit", "evaluate: keras_evaluate"} <= titles
    jsonschema = pytest.importorskip("jsonschema")
    spec = yaml.safe_load((repo / "pipelines" / "vae.yaml").read_text())
    jsonschema.validate(spec, schema)
    spec["stages"][2]["params"]["epocs"] = 3
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(spec, schema)


def test_ui_serves_the_store(workdir):
    """`dlpipe ui` starts MLflow's server on 127.0.0.1 against the SQLite store."""
    import socket
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "dlpipe", "ui", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        first = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}" in first and "sqlite:///" in first
        store = first.split()[3]
        # No runs yet: no experiment to land on; how MLflow's own CLI reaches the store.
        assert proc.stdout.readline().strip() == f"MLflow CLI: export MLFLOW_TRACKING_URI={store}"
        deadline = time.time() + 90
        body = ""
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    body = r.read().decode()
                    break
            except OSError:
                time.sleep(1)
        assert body.strip() == "OK"
    finally:
        import os
        import signal

        os.killpg(proc.pid, signal.SIGTERM)  # the server and the workers it started
        proc.wait(timeout=30)
        time.sleep(1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert (workdir / "mlruns" / "mlflow.db").exists()


def test_ui_command_binds_loopback():
    cmd = ui_command("sqlite:////x/mlflow.db", "127.0.0.1", 5000)
    assert cmd[1:4] == ["-m", "mlflow", "ui"] and "127.0.0.1" in cmd


def test_closed_stdout_is_not_an_error(repo):
    """`dlpipe validate spec | head -0`: the reader leaves early; no error message."""
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "dlpipe", "validate", str(repo / "pipelines" / "vae.yaml")],
        cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    proc.stdout.close()  # before dlpipe has written anything
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) in (0, 141)
    assert "BrokenPipeError" not in err and "Traceback" not in err
