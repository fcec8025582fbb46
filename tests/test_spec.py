"""Spec loading, overrides and validation errors."""

from __future__ import annotations

import textwrap

import pytest

from dlpipe.errors import DlpipeError, SpecError
from dlpipe.spec import (
    apply_overrides,
    flatten_params,
    load_yaml,
    parse_override,
    resolve_path,
    validate,
)

GOOD = textwrap.dedent(
    """\
    name: t
    seed: 3
    stages:
      - kind: data
        use: sklearn_digits
      - kind: model
        use: vae
        params:
          latent_dim: 2
      - kind: train
        use: keras_fit
        params:
          epochs: 2
          optimizer:
            learning_rate: 0.01
          loss_weights: {kl: 0.5}
    """
)


def check(text: str, host, overrides=()):
    doc = load_yaml(textwrap.dedent(text), "spec.yaml")
    apply_overrides(doc, overrides)
    return validate(doc, host.registry, overrides)


def problems(text: str, host, overrides=()) -> str:
    with pytest.raises(SpecError) as info:
        check(text, host, overrides)
    return str(info.value)


def test_good_spec_resolves_defaults(host):
    spec = check(GOOD, host)
    assert [s.id for s in spec.stages] == ["data", "model", "train"]
    train = spec.stage("train").params
    assert train.epochs == 2 and train.optimizer.learning_rate == 0.01
    assert train.optimizer.name == "adam"  # default filled in
    assert spec.strategy_name == "auto"
    assert spec.experiment == "t"


def test_unknown_param_names_line_key_and_suggestion(host):
    text = GOOD.replace("epochs: 2", "epocs: 2")
    msg = problems(text, host)
    assert "spec.yaml:13:" in msg
    assert "stages[2].params.epocs" in msg and "(train.epocs)" in msg
    assert "did you mean: epochs?" in msg
    assert "available: epochs, batch_size" in msg


def test_wrong_type_says_expected_and_got(host):
    msg = problems(GOOD.replace("latent_dim: 2", "latent_dim: two"), host)
    assert "spec.yaml:9:" in msg
    assert "expected: an integer" in msg
    assert "got:      'two' (str)" in msg


def test_unknown_plugin_lists_available_and_close_matches(host):
    msg = problems(GOOD.replace("use: sklearn_digits", "use: sklearn_digit"), host)
    assert "spec.yaml:5:" in msg and "unknown data stage 'sklearn_digit'" in msg
    assert "did you mean: sklearn_digits" in msg
    available = next(line for line in msg.splitlines() if "available:" in line)
    names = available.split("available:")[1].strip().split(", ")
    assert names == sorted(names) and {"image_directory", "npz", "sklearn_digits"} <= set(names)


def test_unknown_architecture_and_kind(host):
    msg = problems(GOOD.replace("use: vae", "use: vea").replace("kind: train", "kind: trian"), host)
    assert "unknown architecture 'vea'" in msg and "did you mean: vae?" in msg
    assert "unknown stage kind 'trian'" in msg and "did you mean: train?" in msg
    assert "2 problems" in msg


def test_every_problem_is_reported_at_once(host):
    text = GOOD.replace("seed: 3", "seed: x").replace("epochs: 2", "epochs: -1")
    msg = problems(text, host)
    assert "2 problems" in msg
    assert "seed" in msg and "a number >= 1" in msg


def test_unknown_loss_term_is_checked_against_the_model(host):
    msg = problems(GOOD.replace("{kl: 0.5}", "{kll: 0.5}"), host)
    assert "model 'vae' has no loss term 'kll'" in msg
    assert "did you mean: kl?" in msg


def test_top_level_typo(host):
    msg = problems("nmae: x\n" + GOOD, host)
    assert "unknown key 'nmae'" in msg and "did you mean: name?" in msg


def test_duplicate_keys_are_errors():
    with pytest.raises(SpecError) as info:
        load_yaml("name: a\nseed: 1\nname: b\nstages: []\n", "d.yaml")
    assert "d.yaml:3:1" in str(info.value)
    assert "duplicate key 'name' (first defined on line 1)" in str(info.value)


@pytest.mark.parametrize(
    "text",
    [
        "name: !!python/object/apply:os.system ['true']\n",
        "name: !!python/name:os.system\n",
        "name: !custom x\n",
    ],
)
def test_unsafe_tags_are_refused(text):
    with pytest.raises(SpecError) as info:
        load_yaml(text, "t.yaml")
    assert "is not allowed" in str(info.value) and "t.yaml:1:" in str(info.value)


def test_yaml_syntax_error_has_a_line():
    with pytest.raises(SpecError) as info:
        load_yaml("name: a\nstages: [\n", "s.yaml")
    assert "s.yaml:3:" in str(info.value) and "invalid YAML" in str(info.value)


def test_duplicate_stage_names(host):
    text = GOOD + "  - kind: train\n    use: keras_fit\n"
    msg = problems(text, host)
    assert "two stages are called 'train'" in msg


def test_overrides_by_dotted_path(host):
    spec = check(
        GOOD,
        host,
        [
            "train.epochs=5",
            "train.optimizer.learning_rate=1e-4",
            "model.latent_dim=3",
            "seed=9",
            "train.loss_weights.kl=2",
        ],
    )
    train = spec.stage("train").params
    assert train.epochs == 5 and train.optimizer.learning_rate == 1e-4
    assert train.loss_weights == {"kl": 2}
    assert spec.stage("model").params.latent_dim == 3 and spec.settings.seed == 9


def test_override_errors_name_the_option(host):
    msg = problems(GOOD, host, ["train.epochs=many"])
    assert "--set train.epochs=many" in msg and "expected: an integer" in msg
    with pytest.raises(DlpipeError, match="did you mean train"):
        check(GOOD, host, ["trian.epochs=1"])
    with pytest.raises(DlpipeError, match="expected PATH=VALUE"):
        parse_override("train.epochs")


def test_resolve_path_maps_stage_names():
    data = {"stages": [{"kind": "data"}, {"kind": "train", "name": "fit"}]}
    assert resolve_path(data, "fit.optimizer.learning_rate") == (
        "stages", 1, "params", "optimizer", "learning_rate",
    )
    assert resolve_path(data, "tracking.uri") == ("tracking", "uri")
    assert resolve_path(data, "strategy.logical_cpus") == ("strategy", "params", "logical_cpus")


def test_flatten_params_uses_the_set_syntax(host):
    flat = flatten_params(check(GOOD, host))
    assert flat["train.optimizer.learning_rate"] == 0.01
    assert flat["model.latent_dim"] == 2
    assert flat["train.loss_weights.kl"] == 0.5
    assert flat["strategy"] == "auto" and flat["seed"] == 3


def test_digest_is_stable_and_ignores_tracking(host):
    a = check(GOOD, host)
    b = check(GOOD, host, ["tracking.run_name=other"])
    c = check(GOOD, host, ["train.epochs=3"])
    assert a.digest() == b.digest() != c.digest()


def test_strategy_validation(host):
    msg = problems(GOOD.replace("seed: 3", "seed: 3\nstrategy: mirored"), host)
    assert "unknown strategy 'mirored'" in msg and "did you mean: mirrored?" in msg
    spec = check(GOOD.replace("seed: 3", "seed: 3\nstrategy: {use: mirrored, params: {logical_cpus: 2}}"), host)
    assert spec.strategy_name == "mirrored" and spec.strategy_params.logical_cpus == 2


# -- Validation never crashes: each former crash is now a located problem ---------------


@pytest.mark.parametrize("date", ["2024-02-30", "2024-02-03"])
def test_a_date_is_text_not_a_crash(host, date):
    msg = problems(GOOD.replace("seed: 3", f"seed: {date}"), host)
    assert "spec.yaml:2:1: seed:" in msg and "expected: an integer" in msg
    assert f"got:      '{date}' (a date, kept as text)" in msg


def test_a_date_in_an_override_is_text(host):
    msg = problems(GOOD, host, ["seed=2024-13-01"])
    assert "--set seed=2024-13-01: seed:" in msg
    assert "got:      '2024-13-01' (a date, kept as text)" in msg
    assert parse_override("name=2024-02-30") == ("name", "2024-02-30")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("!!timestamp 2001-12-14", "the YAML tag '!!timestamp' is not allowed: dates are written as text"),
        ("!!binary aGVsbG8=", "the YAML tag '!!binary' is not allowed"),
        ("!!int x", "'x' cannot be read as an integer"),
        ("!!bool maybe", "'maybe' cannot be read as true or false"),
        ("!!float x", "'x' cannot be read as a number"),
        ("!!map x", "'x' cannot be read as a mapping"),
        ("!!str [1]", "the YAML tag '!!str' does not fit a list"),
        ("9" * 400, "the number has 400 digits"),
        ("0x" + "f" * 5000, "the number has 5002 digits"),
        ('"\\uD800"', "the text holds a lone surrogate (an escape in \\ud800-\\udfff), which "
                      "is not a character"),
    ],
)
def test_values_yaml_cannot_construct_are_problems(value, message):
    with pytest.raises(SpecError) as info:
        load_yaml(f"name: t\nseed: {value}\n", "v.yaml")
    assert "v.yaml:2:7: seed: " + message in str(info.value)


def test_keys_that_are_not_names():
    with pytest.raises(SpecError) as info:
        load_yaml('name: t\n? [1, 2]\n: x\n"\\uD800": 1\n!!python/name:os.system : 2\n', "k.yaml")
    msg = str(info.value)
    assert "k.yaml:2:3: <top level>: a key must be a name, not a list or mapping" in msg
    assert "a key holds a lone surrogate, which is not a character" in msg
    assert "k.yaml:5:1: <top level>: the YAML tag '!!python/name:os.system' is not allowed" in msg


def test_a_key_is_kept_as_written():
    assert load_yaml("~: 1\n1: 2\ntrue: 3\n", "k.yaml").data == {"~": 1, "1": 2, "true": 3}


def test_two_documents_in_one_file():
    with pytest.raises(SpecError) as info:
        load_yaml("name: a\n---\nname: b\n", "two.yaml")
    assert "two.yaml:2:1: <top level>: invalid YAML: expected a single document in the " \
           "stream but found another document" in str(info.value)


def test_a_control_character_has_a_line_and_column():
    with pytest.raises(SpecError) as info:
        load_yaml("name: t\nseed: 1\x00\n", "c.yaml")
    assert "c.yaml:2:8: <top level>: invalid YAML: the character U+0000 is not allowed " \
           "in YAML text" in str(info.value)


def test_a_byte_that_is_not_utf8_has_a_line_and_column(tmp_path):
    from dlpipe.spec import read_spec_file

    path = tmp_path / "b.yaml"
    path.write_bytes("name: tés\nseed: 1\nstages: [x\xff]\n".encode().replace(b"\xc3\xbf", b"\xff"))
    with pytest.raises(SpecError) as info:
        read_spec_file(path)
    msg = str(info.value)
    assert f"{path}:3:11: <top level>: the file is not UTF-8 text: byte 0xff cannot be " \
           "decoded" in msg
    assert "expected: a YAML file saved as UTF-8" in msg


def test_a_huge_file_is_refused_before_parsing(tmp_path):
    from dlpipe.spec import read_spec_file

    path = tmp_path / "huge.yaml"
    path.write_text("name: x\n" + "# padding\n" * 200_000)
    with pytest.raises(SpecError) as info:
        read_spec_file(path)
    assert f"{path}: <top level>: the file is larger than 128,000 bytes" in str(info.value)


def test_an_unreadable_spec_path(tmp_path):
    from dlpipe.spec import read_spec_file

    with pytest.raises(DlpipeError, match="cannot read spec file .*: File name too long"):
        read_spec_file(tmp_path / ("a" * 5000 + ".yaml"))


def test_a_bracket_in_a_key_is_reported_at_that_key(host):
    msg = problems(GOOD.replace("epochs: 2", "epochs[0]: 2"), host)
    assert "spec.yaml:13:7: stages[2].params.epochs[0] (train.epochs[0]): unknown key " \
           "'epochs[0]'" in msg
    assert "did you mean: epochs?" in msg


def test_a_nested_unknown_key_lists_the_nested_fields(host):
    msg = problems(GOOD.replace("learning_rate: 0.01", "learning_rat: 0.01"), host)
    assert "stages[2].params.optimizer.learning_rat (train.optimizer.learning_rat): " \
           "unknown key 'learning_rat'" in msg
    assert "did you mean: learning_rate?" in msg


def test_union_members_are_not_keys(host):
    msg = problems(GOOD.replace("seed: 3", "seed: 3\nstrategy: {use: [x]}"), host)
    assert "spec.yaml:3:12: strategy.use: Input should be a valid string" in msg
    assert "StrategySpec" not in msg
    msg = problems(GOOD.replace("seed: 3", "seed: 3\nstrategy: {use: auto, param: {}}"), host)
    assert "strategy.param: unknown key 'param'" in msg and "did you mean: params?" in msg


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.optimizer.lr[1]=1", "path 'train.optimizer.lr[1]': 'lr[1]' is not a key name; a "
         "path is key names joined by dots, such as train.optimizer.learning_rate (no [index], "
         "quotes or spaces)"),
        ("a[0]=1", "path 'a[0]': 'a[0]' is neither a top-level key nor a stage name"),
        ("stages=5", "path 'stages': the list of stages cannot be set by path; name a stage "
         "instead, as in train.epochs\n    stages: data, model, train"),
        ("seed=&a [*a]", "--set 'seed=&a [*a]': the alias *a is used inside the value it "
         "names, so that value would contain itself forever"),
        ("seed=[", "--set 'seed=[': the value is not valid YAML: "),
        ("seed=!!binary aGk=", "--set 'seed=!!binary aGk=': the YAML tag '!!binary' is not "
         "allowed"),
        ("seed=" + "[" * 70 + "]" * 70, "the spec nests deeper than 64 levels here (expected "
         "at most 64 nested mappings and lists)"),
    ],
)
def test_bad_overrides_are_explained(host, override, message):
    with pytest.raises(DlpipeError) as info:
        check(GOOD, host, [override])
    assert message in str(info.value)


def test_an_override_reaches_the_right_stage_past_a_broken_one(host):
    doc = load_yaml(GOOD.replace("stages:\n", "stages:\n  - just text\n"), "spec.yaml")
    apply_overrides(doc, ["train.epochs=7"])
    assert doc.data["stages"][3]["params"]["epochs"] == 7


def test_a_recursive_alias_is_refused_at_its_line():
    with pytest.raises(SpecError) as info:
        load_yaml("name: t\nloop: &r [1, *r]\n", "r.yaml")
    msg = str(info.value)
    assert "r.yaml:2:14: loop[1]: the alias *r is used inside the value it names" in msg
    assert "expected: an alias to a value defined before, outside it" in msg


def test_deep_nesting_is_refused_before_the_stack_runs_out():
    with pytest.raises(SpecError) as info:
        load_yaml("name: t\ndeep: " + "[" * 500 + "]" * 500 + "\n", "d.yaml")
    msg = str(info.value)
    assert "d.yaml:2:70: deep[0][0][0][0][0]: the spec nests deeper than 64 levels here" in msg
    load_yaml("deep: " + "[" * 63 + "]" * 63 + "\n", "d.yaml")  # 64 levels with the top


def test_aliases_count_towards_the_depth():
    text = "a: &a " + "[" * 40 + "]" * 40 + "\nb: " + "[" * 30 + "*a" + "]" * 30 + "\n"
    with pytest.raises(SpecError) as info:
        load_yaml(text, "d.yaml")
    assert "d.yaml:2:34: b[0][0][0][0][0]: the alias *a nests the spec deeper than 64 " \
           "levels" in str(info.value)


def laughs(levels: int) -> str:
    lines = ["l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels + 1):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]")
    return "\n".join(lines) + "\n"


def test_billion_laughs_is_refused_quickly():
    import time

    start = time.monotonic()
    with pytest.raises(SpecError) as info:
        load_yaml(laughs(9), "laughs.yaml")
    assert time.monotonic() - start < 2
    msg = str(info.value)
    assert "laughs.yaml:5:45: l4[7]: the alias *l3 stands for 11,111 values; with it the " \
           "spec holds more than 100,000 values" in msg
    assert "expected: at most 100,000 values, counting each alias as the values it repeats" in msg
    assert len(load_yaml(laughs(3), "ok.yaml").data["l3"]) == 10  # small ones are fine


def test_too_many_plain_values(monkeypatch):
    from dlpipe.spec import document

    monkeypatch.setattr(document, "MAX_VALUES", 10)
    with pytest.raises(SpecError) as info:
        load_yaml("a: [1, 2, 3, 4, 5, 6, 7, 8, 9]\n", "n.yaml")
    assert "n.yaml:1:26: a[7]: the spec holds more than 10 values" in str(info.value)  # keys count


@pytest.mark.parametrize(("seed", "expected"), [("-1", "a number >= 0"), ("4294967296", "a number < 4294967296")])
def test_the_seed_is_checked_before_tensorflow(host, seed, expected):
    msg = problems(GOOD.replace("seed: 3", f"seed: {seed}"), host)
    assert "spec.yaml:2:1: seed:" in msg and f"expected: {expected}" in msg
    assert check(GOOD.replace("seed: 3", "seed: 4294967295"), host).settings.seed == 2**32 - 1


def test_a_long_integer_is_described_by_its_size(host):
    msg = problems(GOOD.replace("seed: 3", "seed: " + "9" * 30), host)
    assert "got:      an integer of 30 digits (int)" in msg


def test_an_unreadable_plugin_path_is_a_plugin_error(tmp_path):
    from dlpipe.errors import PluginError
    from dlpipe.plugins import load_plugins

    with pytest.raises(PluginError, match="plugin file 'a+.py' listed in the spec: File name too long"):
        load_plugins(plugin_dirs=[], entry_points=False, spec_plugins=["a" * 5000 + ".py"],
                     spec_dir=tmp_path)


def test_a_part_full_of_mistakes_is_summarised(host):
    keys = "".join(f"      k{i}: 1\n" for i in range(300))
    msg = problems(GOOD.replace("      latent_dim: 2\n", "      latent_dim: 2\n" + keys), host)
    assert "51 problems in the pipeline spec" in msg
    assert msg.count("unknown key 'k") == 50
    assert "stages[1].params (model): and 250 more errors in this part of the spec, not " \
           "shown" in msg


def test_at_most_a_hundred_problems_are_printed():
    text = "a: 1\n" * 150
    with pytest.raises(SpecError) as info:
        load_yaml(text, "dup.yaml")
    msg = str(info.value)
    assert msg.startswith("dup.yaml: 149 problems in the pipeline spec")
    assert msg.count("duplicate key 'a'") == 100
    assert msg.endswith("... and 49 more problems, not shown")
