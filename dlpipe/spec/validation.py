"""Validating a loaded spec against the registry of what plugins provide.

A spec is validated in full before anything heavy starts: its structure, that every
``use:`` names a registered plugin, every plugin's ``params`` against that plugin's
schema, that every stage's needs are provided by a stage before it, and the checks
across stages (:mod:`dlpipe.spec.checks`). All problems are reported together, each
with file, line, key path, what was expected, what was found and close matches.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import ValidationError

from dlpipe.errors import KeyPath, Problem, SpecError, close_matches
from dlpipe.params import Params
from dlpipe.plugins import MODEL_STAGE_RUN, Registry
from dlpipe.spec.checks import (
    cross_stage_problems,
    driver_problems,
    needs_problems,
    reference_problems,
)
from dlpipe.spec.document import YamlDocument
from dlpipe.spec.problems import describe, pydantic_problems
from dlpipe.spec.settings import (
    TOP_LEVEL_KEYS,
    ResolvedSpec,
    ResolvedStage,
    SpecSettings,
    StageSpec,
    StrategySpec,
)


def validate(doc: YamlDocument, registry: Registry, overrides: Sequence[str] = ()) -> ResolvedSpec:
    """Validate a loaded spec against the registry; raise :class:`SpecError` listing
    every problem."""
    source = doc.source
    data = doc.data
    if not isinstance(data, dict):
        raise SpecError(
            source,
            [Problem((), "a pipeline spec must be a mapping", doc.locate(()),
                     expected=f"a mapping with keys {', '.join(TOP_LEVEL_KEYS)}",
                     got=describe(data))],
        )
    problems: list[Problem] = []
    raw_stages = data.get("stages")
    top_data = {k: v for k, v in data.items() if k != "stages"}
    top: SpecSettings | None = None
    try:
        top = SpecSettings.model_validate({**top_data, "stages": [{"kind": "-", "use": "-"}]})
    except ValidationError as exc:
        problems.extend(pydantic_problems(exc, SpecSettings, (), doc))
    if not isinstance(raw_stages, list) or not raw_stages:
        problems.append(
            Problem(("stages",), "the spec needs a non-empty list of stages",
                    doc.locate(("stages",)),
                    expected="a list of {kind, use, params} mappings",
                    got="nothing" if raw_stages is None else describe(raw_stages))
        )
        raw_stages = []

    seen_ids: dict[str, int] = {}
    stage_specs: list[StageSpec] = []
    stages: list[ResolvedStage] = []
    for index, raw_stage in enumerate(raw_stages):
        base: KeyPath = ("stages", index)
        try:
            stage = StageSpec.model_validate(raw_stage)
        except ValidationError as exc:
            label = raw_stage.get("name") or raw_stage.get("kind") if isinstance(raw_stage, dict) else None
            problems.extend(pydantic_problems(exc, StageSpec, base, doc, label and str(label)))
            continue
        stage_specs.append(stage)
        label = stage.id
        if stage.id in TOP_LEVEL_KEYS:
            problems.append(Problem((*base, "name"), f"stage name {stage.id!r} clashes with a top-level key", doc.locate((*base, "name")), expected="another name", label=label))
        if stage.id in seen_ids:
            problems.append(
                Problem(
                    (*base, "name") if stage.name else (*base, "kind"),
                    f"two stages are called {stage.id!r} (stages[{seen_ids[stage.id]}] too)",
                    doc.locate((*base, "name") if stage.name else base),
                    expected="unique stage names; add 'name:' to one of them",
                    label=label,
                )
            )
        seen_ids.setdefault(stage.id, index)
        if stage.kind not in registry.kinds:
            problems.append(
                Problem(
                    (*base, "kind"),
                    f"unknown stage kind {stage.kind!r}",
                    doc.locate((*base, "kind")),
                    suggestions=close_matches(stage.kind, registry.kinds),
                    available=registry.kinds,
                    label=label,
                )
            )
            continue
        entry = registry.lookup_stage(stage.kind, stage.use)
        if entry is None:
            names = registry.stage_names(stage.kind)
            what = _use_noun(registry, stage.kind)
            problems.append(
                Problem(
                    (*base, "use"),
                    f"unknown {what} {stage.use!r}",
                    doc.locate((*base, "use")),
                    suggestions=close_matches(stage.use, names),
                    available=names,
                    label=label,
                )
            )
            continue
        try:
            params = entry.params.model_validate(stage.params)
        except ValidationError as exc:
            problems.extend(pydantic_problems(exc, entry.params, (*base, "params"), doc, label))
            continue
        stages.append(ResolvedStage(stage, params, entry.plugin, index))

    if top is None:
        raise SpecError(source, problems)
    model = top.model_copy(update={"stages": stage_specs})
    strategy = model.strategy if isinstance(model.strategy, StrategySpec) else StrategySpec(use=model.strategy)
    strategy_params: Params | None = None
    s_entry = registry.strategies.get(strategy.use)
    s_path: KeyPath = ("strategy", "use") if isinstance(model.strategy, StrategySpec) else ("strategy",)
    if s_entry is None:
        names = sorted(registry.strategies)
        problems.append(
            Problem(s_path, f"unknown strategy {strategy.use!r}", doc.locate(s_path),
                    suggestions=close_matches(strategy.use, names), available=names)
        )
    else:
        try:
            strategy_params = s_entry.params.model_validate(strategy.params)
        except ValidationError as exc:
            problems.extend(pydantic_problems(exc, s_entry.params, ("strategy", "params"), doc))

    problems.extend(needs_problems(raw_stages, registry, doc))
    problems.extend(cross_stage_problems(stages, registry, doc))
    problems.extend(driver_problems(stages, registry, doc))
    problems.extend(reference_problems(stages, registry, doc))
    if problems:
        raise SpecError(source, problems)
    assert strategy_params is not None
    return ResolvedSpec(
        source=source,
        raw=data,
        settings=model,
        stages=stages,
        strategy_name=strategy.use,
        strategy_params=strategy_params,
        overrides=list(overrides),
    )


def spec_plugins(doc: YamlDocument) -> list[str]:
    """The spec's ``plugins:`` list, read before validation (plugins add stages)."""
    data = doc.data
    if not isinstance(data, dict):
        return []
    plugins = data.get("plugins") or []
    if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
        raise SpecError(
            doc.source,
            [Problem(("plugins",), "plugins must be a list of module names or .py paths",
                     doc.locate(("plugins",)), expected="a list of strings",
                     got=describe(plugins))],
        )
    return plugins


def _use_noun(registry: Registry, kind: str) -> str:
    """What ``use:`` names in a stage of ``kind``: an architecture where the kind's
    implementations are the model stage, else a stage of that kind."""
    entries = [registry.lookup_stage(kind, name) for name in registry.stage_names(kind)]
    if any(e is not None and e.run == MODEL_STAGE_RUN for e in entries):
        return "architecture"
    return f"{kind} stage"
