"""`dlpipe validate` never crashes: whatever the spec file and the --set arguments, it
exits 0 (valid) or 2 (a message), without a traceback, quickly and in bounded memory.

The property-based test mutates the real ``pipelines/*.yaml``: bytes inserted, deleted
or replaced; YAML fragments that once crashed validation (dates, recursive aliases,
billion laughs, deep nesting, brackets, huge numbers, tags); keys dropped, stages
swapped or repeated, values of the wrong type; and random ``--set`` arguments. It is
derandomized and capped at :data:`BUDGET_S` seconds, so CI stays reproducible and
fast.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import re
import tempfile
import time
import tracemalloc
from pathlib import Path

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from dlpipe.cli import main  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PIPELINES = sorted((REPO / "pipelines").glob("*.yaml"))
#: Bounds per validation, and for the whole property-based test.
MAX_SECONDS = 5.0
MAX_PEAK_MB = 200
BUDGET_S = 60.0
EXAMPLES = 1000


def laughs(levels: int) -> str:
    lines = ["l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, levels + 1)]
    return "\n".join(lines)


FRAGMENTS = [
    "seed: 2024-02-30", "seed: 2024-02-03", "x: 2024-13-01", "t: 2001-12-14t21:59:43.10-05:00",
    "loop: &r [*r]", "m: &m {a: *m}", laughs(4), laughs(7), laughs(9),
    "deep: " + "[" * 500 + "]" * 500, "deep: " + "{a: " * 300 + "1" + "}" * 300,
    "a[0]: 1", "[", "]", "{", "key: [1, 2", "seed: " + "9" * 5000, "seed: 0x" + "f" * 5000,
    "seed: 99999999999999999999", "seed: -1", "seed: 4294967296", "seed: 1e400", "seed: .nan",
    "seed: true", "name: null", "name: 5", "name: [x]", "blob: !!binary aGVsbG8=",
    "s: !!set {a, b}", "o: !!omap [{a: 1}]", "? [1, 2]\n: x", "? {a: 1}\n: x", "1: one",
    "null: x", "名前: 値", "name: \u202eevil", "name: 😀", "<<: {a: 1}", "t: !!timestamp 2001-12-14",
    "f: !!float x", "i: !!int x", "b: !!bool x", "%YAML 1.1", "---", "...", "stages: 5",
    "stages: []", "stages: {a: 1}", "stages: [1, 2]", "stages: [[]]", "params: [1]",
    "params: 5", "kind: [data]", "use: {a: 1}", "tracking: 5", "strategy: 5",
    "strategy: {use: [x]}", "plugins: 5", "plugins: [1]", "plugins: [no_such_plugin_xyz]",
    "x: !!python/object/apply:os.system ['true']", "\t", "\x00", 'a: "\\uD800"',
    "a: 'unterminated", "&anchor", "*unknown_alias", "space: {train.epochs[0]: {type: int}}",
]
BYTES = [b"\xff", b"\xfe", b"\xc3", b"\x80", b"\xed\xa0\x80", b"\x00", b"\x1b", b"\r", b"\t",
         b"\xef\xbb\xbf", b"[", b"]", b"{", b"}", b":", b"&", b"*", b"!", b"%", b"|", b">",
         b"-", b"#", b"'", b'"', b"\n", b" ", b"?", b",", b"@", b"`", b"\\"]
VALUES = [None, 5, -1, 0, 2**70, 1.5, float("inf"), "x", "", [], {}, [1], {"a": 1}, True,
          datetime.date(2024, 2, 3), "2024-02-30", "[", "a.b", [[[]]], {"kind": "data"},
          "model", "train", "keras_fit", "sklearn_digits"]
SET_PATHS = ["seed", "name", "experiment", "precision", "strategy", "tracking", "tracking.uri",
             "tracking.tags.x", "tracking.x.y", "strategy.x", "strategy.params.x", "seed.x",
             "stages", "stages.0", "plugins", "x", "x.y.z", "", "a[0]", "train.optimizer.lr[1]",
             "train[", "train.", ".train", "train..x", "train.optimizer",
             "train.optimizer.learning_rate", "train.loss_weights.0", "model", "model.use",
             "model.params", "data.params.x", "evaluate.x", "tune.space", "train.epochs.x",
             "名前", "train.epochs", "model.hidden", "model.hidden.0", "data.use", " seed "]
SET_VALUES = ["1", "x", "2024-13-01", "2024-02-03", "&a [*a]", "!!binary aGk=", "[",
              "99999999999999999999", "1e999", ".nan", "", "null", "[1, 2]", "{a: 1}",
              "!!python/name:os.system", "'", "😀", "{", "- a", "a: b", "*x", "!!set {a}",
              "? [1]\n: 2", "4294967296", "-1", "[" * 80 + "]" * 80, "\udcff", "=",
              "[&a [1,1,1,1,1,1,1,1,1,1], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a], "
              "&c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b], &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c], "
              "&e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d], [*e,*e,*e,*e,*e,*e,*e,*e,*e,*e]]"]


# -- mutations ---------------------------------------------------------------------------

index = st.integers(min_value=0, max_value=10**6)
structural = st.one_of(
    st.tuples(st.just("swap"), index, index),
    st.tuples(st.just("drop_stage"), index),
    st.tuples(st.just("repeat_stage"), index, index),
    st.tuples(st.just("drop_key"), index),
    st.tuples(st.just("change"), index, st.sampled_from(VALUES)),
)
textual = st.one_of(
    st.tuples(st.just("fragment"), index, st.sampled_from(FRAGMENTS)),
    st.tuples(st.just("value"), index, st.sampled_from(FRAGMENTS)),
    st.tuples(st.just("insert"), index, st.sampled_from(BYTES)),
    st.tuples(st.just("replace"), index, st.sampled_from(BYTES)),
    st.tuples(st.just("delete"), index, st.integers(1, 40)),
    st.tuples(st.just("random"), index, st.binary(min_size=1, max_size=8)),
)
set_arg = st.one_of(
    st.tuples(st.sampled_from(SET_PATHS), st.sampled_from(SET_VALUES)).map("=".join),
    st.text(max_size=30),
)


def _nodes(data, out):
    """Every (container, key) pair in ``data``, depth first."""
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in list(items):
        out.append((data, key))
        _nodes(value, out)
    return out


def mutate_structure(text: str, ops) -> str:
    data = yaml.safe_load(text)
    stages = data.get("stages")
    for op, *args in ops:
        if op in ("swap", "drop_stage", "repeat_stage") and stages:
            i = args[0] % len(stages)
            if op == "swap":
                j = args[1] % len(stages)
                stages[i], stages[j] = stages[j], stages[i]
            elif op == "drop_stage":
                stages.pop(i)
            else:
                stages.insert(args[1] % (len(stages) + 1), dict(stages[i]))
        elif op in ("drop_key", "change"):
            nodes = _nodes(data, [])
            parent, key = nodes[args[0] % len(nodes)]
            if op == "drop_key" and isinstance(parent, dict):
                del parent[key]
            elif op == "change":
                parent[key] = args[1]
    return yaml.dump(data, sort_keys=False, allow_unicode=True)


def mutate_text(text: str, ops) -> bytes:
    for op, at, what in ops:
        if op in ("fragment", "value"):
            lines = text.split("\n")
            i = at % (len(lines) + 1)
            if op == "fragment":
                indent = re.match(r"[ -]*", lines[i]).group(0).replace("-", " ") if i < len(lines) else ""
                lines.insert(i, "\n".join(indent + part for part in what.split("\n")))
            elif i < len(lines) and ":" in lines[i]:
                value = what.split(":", 1)[1].strip() if ":" in what else what
                lines[i] = lines[i].split(":", 1)[0] + ": " + value.split("\n")[0]
            text = "\n".join(lines)
    data = text.encode("utf-8", "surrogatepass")
    for op, at, what in ops:
        at = at % (len(data) + 1)
        if op == "insert" or op == "random":
            data = data[:at] + what + data[at:]
        elif op == "replace":
            data = data[:at] + what + data[at + 1 :]
        elif op == "delete":
            data = data[:at] + data[at + what :]
    return data


# -- running validate --------------------------------------------------------------------


def validate_cli(path: Path, overrides) -> tuple[int, str, float, float]:
    """``dlpipe validate`` in-process: exit code, output, seconds, peak MB allocated."""
    argv = ["validate", str(path), "--plugins-dir", str(REPO / "plugins")]
    argv += [f"--set={o}" for o in overrides]
    out = io.StringIO()
    tracemalloc.start()
    start = time.monotonic()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                code = main(argv)
            except SystemExit as exc:  # argparse
                code = exc.code if isinstance(exc.code, int) else 2
    finally:
        seconds = time.monotonic() - start
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    return code, out.getvalue(), seconds, peak


def assert_never_crashes(path: Path, overrides=()) -> int:
    code, output, seconds, peak = validate_cli(path, overrides)
    assert code in (0, 2), f"exit {code}:\n{output}"
    assert "Traceback" not in output and "--debug for the traceback" not in output, output
    if code == 2:
        assert "error: " in output, output
    assert seconds < MAX_SECONDS, f"took {seconds:.1f} s"
    assert peak < MAX_PEAK_MB, f"allocated {peak:.0f} MB"
    return code


@pytest.fixture(scope="module")
def folder():
    with tempfile.TemporaryDirectory() as name:
        yield Path(name)


@pytest.fixture(scope="module", autouse=True)
def no_entry_points():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DLPIPE_DISABLE_ENTRY_POINTS", "1")
        yield


@pytest.mark.parametrize("fragment", FRAGMENTS)
def test_each_fragment_at_the_top_of_a_real_spec(folder, fragment):
    path = folder / "fragment.yaml"
    path.write_bytes((fragment + "\n" + (REPO / "pipelines" / "xor.yaml").read_text()).encode(
        "utf-8", "surrogatepass"))
    assert_never_crashes(path)


@pytest.mark.parametrize("override", [f"{p}={v}" for p, v in zip(SET_PATHS, SET_VALUES * 2, strict=False)])
def test_each_override_on_a_real_spec(override):
    assert_never_crashes(REPO / "pipelines" / "xor.yaml", [override])


_spent = {"seconds": 0.0, "cases": 0}


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    spec=st.sampled_from(PIPELINES),
    structure=st.lists(structural, max_size=3),
    text=st.lists(textual, max_size=3),
    overrides=st.lists(set_arg, max_size=3),
)
def test_validate_never_crashes(folder, spec, structure, text, overrides):
    if _spent["seconds"] > BUDGET_S:
        return  # the budget is spent: the remaining examples pass without running
    start = time.monotonic()
    source = spec.read_text()
    if structure:
        source = mutate_structure(source, structure)
    path = folder / spec.name
    path.write_bytes(mutate_text(source, text))
    try:
        assert_never_crashes(path, overrides)
    finally:
        _spent["seconds"] += time.monotonic() - start
        _spent["cases"] += 1
