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
    assert spec.stage("model").params.latent_dim == 3 and spec.model.seed == 9


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
