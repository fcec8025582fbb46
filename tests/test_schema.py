"""`dlpipe schema`: every example pipeline passes it, broken copies fail it with an
error that names the bad key, and it accepts exactly what `dlpipe validate` accepts
for the specs tried here.

The files are checked by check-jsonschema, the tool users run, when it is installed;
otherwise by the jsonschema library's best match, which words its errors the same way.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dlpipe.errors import SpecError
from dlpipe.plugins import load_plugins
from dlpipe.schema import BOOL_TEXT, INT_TEXT, NUMBER_TEXT, spec_json_schema
from dlpipe.spec import read_spec_file, validate

REPO = Path(__file__).resolve().parent.parent
PIPELINES = sorted((REPO / "pipelines").glob("*.yaml"))


@pytest.fixture(scope="module")
def registry():
    return load_plugins(plugin_dirs=[REPO / "plugins"], entry_points=False).registry


@pytest.fixture(scope="module")
def schema_file(registry, tmp_path_factory):
    path = tmp_path_factory.mktemp("schema") / "dlpipe.schema.json"
    path.write_text(json.dumps(spec_json_schema(registry), indent=1))
    return path


def schema_errors(schema_file: Path, files: list[Path]) -> dict[str, str]:
    """``{file name: its error report}`` for the files that fail the schema."""
    if importlib.util.find_spec("check_jsonschema") is not None:
        done = subprocess.run(
            [sys.executable, "-m", "check_jsonschema", "--schemafile", str(schema_file),
             *map(str, files)],
            capture_output=True, text=True, timeout=120,
        )
        reports: dict[str, str] = {}
        for line in (done.stdout + done.stderr).splitlines():
            for f in files:
                if line.strip().startswith(f"{f}::"):
                    reports[f.name] = reports.get(f.name, "") + line.strip()[len(str(f)) + 2:]
        assert done.returncode == (1 if reports else 0), done.stdout + done.stderr
        return reports
    import jsonschema
    import yaml

    validator = jsonschema.Draft202012Validator(json.loads(schema_file.read_text()))
    out = {}
    for f in files:
        error = jsonschema.exceptions.best_match(validator.iter_errors(yaml.safe_load(f.read_text())))
        if error is not None:
            out[f.name] = f"{error.json_path}: {error.message}"
    return out


def validate_file(path: Path, registry) -> None:
    validate(read_spec_file(path), registry)


def test_every_pipeline_passes_the_schema(schema_file):
    assert schema_errors(schema_file, PIPELINES) == {}


#: (pipeline, text replaced, replacement, what the schema error says)
BROKEN = [
    # The example: a typo in a VAE param named 'keras_layers' instead.
    ("vae", "latent_dim: 2", "latent_dm: 2",
     "$.stages[1].params: Additional properties are not allowed ('latent_dm' was unexpected)"),
    ("vae", "use: vae", "use: vea", "$.stages[1].use: 'vea' is not one of ['alexnet'"),
    ("vae", "kind: model", "kind: modle", "$.stages[1].kind: 'modle' is not one of ["),
    ("vae", "epochs: 80", "epochs: 0",
     "$.stages[2].params.epochs: 0 is less than the minimum of 1"),
    ("vae", "epochs: 80", "epochs: forty",
     "$.stages[2].params.epochs: 'forty' does not match"),
    ("vae", "name: adam", "name: adma", "$.stages[2].params.optimizer.name: 'adma' is not one of"),
    ("vae", "patience: 15", "patience: 15\n        patients: 3",
     "$.stages[2].params.early_stopping: Additional properties are not allowed "
     "('patients' was unexpected)"),
    ("vae", "use: keras_evaluate", "use: keras_evaluate\n    parms: {}",
     "$.stages[3]: Additional properties are not allowed ('parms' was unexpected)"),
    ("vae", "strategy: auto", "strategy: mirorred", "$.strategy: 'mirorred' is not one of"),
    ("vae", "strategy: auto", "strategy: {use: cpu, params: {logical_cpu: 2}}",
     "$.strategy.params: Additional properties are not allowed ('logical_cpu' was unexpected)"),
    ("vae", "seed: 42", "sed: 42",
     "$: Additional properties are not allowed ('sed' was unexpected)"),
    ("vae", "mode: min", "mode: minimum", "$.stages[2].params.early_stopping.mode: 'minimum'"),
    ("mlp_tune", "model.dropout: {type: float", "model.dropout: {type: real",
     "$.stages[3].params.space['model.dropout'].type: 'real' is not one of "
     "['categorical', 'float', 'int']"),
]


def _write_copy(tmp_path: Path, index: int, pipeline: str, old: str, new: str) -> Path:
    text = (REPO / "pipelines" / f"{pipeline}.yaml").read_text()
    assert old in text, f"{pipeline}.yaml has no {old!r}"
    out = tmp_path / f"broken_{index}_{pipeline}.yaml"
    out.write_text(text.replace(old, new, 1))
    return out


def test_broken_copies_fail_naming_the_bad_key(schema_file, registry, tmp_path):
    files = [_write_copy(tmp_path, i, *case[:3]) for i, case in enumerate(BROKEN)]
    reports = schema_errors(schema_file, files)
    for f, (_pipeline, _old, new, expected) in zip(files, BROKEN, strict=True):
        assert f.name in reports, f"{new!r} passed the schema"
        assert expected in reports[f.name], reports[f.name]
        # dlpipe validate agrees that the copy is broken.
        with pytest.raises(SpecError):
            validate_file(f, registry)


#: Spellings that `dlpipe validate` accepts (pydantic's lax mode), so the schema must too.
LAX = [
    ("vae", "batch_size: 32", 'batch_size: "32"'),  # the example
    ("vae", "learning_rate: 0.003", "learning_rate: 3e-3"),  # text to YAML 1.1
    ("vae", "learning_rate: 0.003", 'learning_rate: " 0.003 "'),
    ("vae", "epochs: 80", "epochs: 80.0"),
    ("vae", "patience: 15", "patience: '1_5'"),
    ("vae", "seed: 42", "seed: '42'"),
    ("dates", "n: 8000,", "n: 8000, mixed_case: yes,"),  # a boolean to YAML 1.1, text to 1.2
    ("dates", "n: 8000,", "n: 8000, mixed_case: 'off',"),
    ("dates", "n: 8000,", "n: 8000, mixed_case: 1,"),
    ("vae", "val_fraction: 0.1", "limit: null\n      val_fraction: 0.1"),
]


def test_what_validate_accepts_passes_the_schema(schema_file, registry, tmp_path):
    files = []
    for i, (pipeline, old, new) in enumerate(LAX):
        f = _write_copy(tmp_path, i, pipeline, old, new)
        validate_file(f, registry)
        files.append(f)
    assert schema_errors(schema_file, files) == {}


def test_stages_are_discriminated_on_kind_and_use(registry):
    import jsonschema

    schema = spec_json_schema(registry)
    jsonschema.Draft202012Validator.check_schema(schema)
    items = schema["properties"]["stages"]["items"]
    assert "anyOf" not in items and "oneOf" not in items
    titles = {rule["then"].get("title") for rule in items["allOf"]}
    assert {"data: sklearn_digits", "data: csv", "data: text_directory", "model: vae",
            "train: keras_fit", "evaluate: keras_evaluate"} <= titles


def _pydantic_reads(kind: type, text: str) -> bool:
    from pydantic import TypeAdapter, ValidationError

    try:
        TypeAdapter(kind).validate_python(text)
    except ValidationError:
        return False
    return True


@pytest.mark.parametrize(("kind", "pattern"), [(int, INT_TEXT), (float, NUMBER_TEXT),
                                               (bool, BOOL_TEXT)])
def test_text_patterns_accept_what_pydantic_reads(kind, pattern):
    """Every text pydantic converts passes the schema's pattern; nonsense does not."""
    rng = random.Random(0)
    alphabet = "0123456789__.eE+- \tinfaINFAtrueyson"
    samples = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 7)))
               for _ in range(3000)]
    samples += ["32", " -3 ", "1_000", "3.00", "1e-3", ".5", "5.", "inf", "-Infinity", "NaN",
                "yes", "Off", "t", "0", "1", "1e1_0", "1_0.5"]
    for text in samples:
        if _pydantic_reads(kind, text):
            assert re.search(pattern, text), f"{kind.__name__}: {text!r}"
    for text in ["forty", "", "1.5.2", "0x10", "--1", "yess"]:
        assert not _pydantic_reads(kind, text)
        assert not re.search(pattern, text), text
