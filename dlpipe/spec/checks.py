"""Checks that look at more than one stage: each stage's needs met by the stages before
it, at most one stage that drives the others, the loss terms train params name, and the
dotted paths params point into earlier stages (a search space)."""

from __future__ import annotations

import copy
from typing import Any

from pydantic import ValidationError

from dlpipe.errors import DlpipeError, KeyPath, Problem, close_matches, format_path
from dlpipe.params import Params
from dlpipe.plugins import STAGE_DEFAULTS, ModelEntry, Registry
from dlpipe.spec.document import YamlDocument
from dlpipe.spec.paths import resolve_path, set_path, stage_ids
from dlpipe.spec.problems import pydantic_problems
from dlpipe.spec.settings import TOP_LEVEL_KEYS, ResolvedStage, architecture


def needs_problems(raw_stages: list[Any], registry: Registry, doc: YamlDocument) -> list[Problem]:
    """Every stage's needs (see ``register(..., needs=...)``) must be provided by a stage
    listed before it: model after data, train after model, evaluate after a model."""
    contracts = []  # (index, stage id, "id (kind/use)", entry or None, provides)
    for index, raw in enumerate(raw_stages):
        if not isinstance(raw, dict) or not isinstance(raw.get("kind"), str):
            continue  # reported by the structure checks
        kind, use = raw["kind"], raw.get("use")
        stage_id = str(raw.get("name") or kind)
        entry = registry.lookup_stage(kind, use) if isinstance(use, str) else None
        provides = entry.provides if entry else STAGE_DEFAULTS.get(kind, ((), ()))[1]
        contracts.append((index, stage_id, f"{stage_id} ({kind}/{use})", entry, provides))

    problems: list[Problem] = []
    provided: set[str] = set()
    for n, (index, stage_id, _, entry, provides) in enumerate(contracts):
        missing = []
        if entry is not None and not (entry.drives_previous and index == 0):
            missing = [need for need in entry.needs if need not in provided]
        if missing:
            earlier = [shown for _, _, shown, _, _ in contracts[:n]]
            wanted = " and ".join(repr(need) for need in missing)
            path: KeyPath = ("stages", index, "kind")
            problems.append(Problem(
                path,
                f"stage {stage_id!r} needs {wanted}, which no stage before it provides",
                doc.locate(path),
                expected="; ".join(_how_to_provide(need, stage_id, contracts[n + 1:], registry)
                                   for need in missing),
                got=f"before it: {', '.join(earlier)}" if earlier else "no stage before it",
                label=stage_id,
            ))
        provided.update(provides)
    return problems


def _how_to_provide(need: str, stage_id: str, later: list[Any], registry: Registry) -> str:
    """How stage ``stage_id`` could get ``need``: a later stage moved up, or a new one."""
    mover = next((c for c in later if need in c[4]), None)
    if mover is not None:
        return f"stage {mover[1]!r} (stages[{mover[0]}], provides {need!r}) moved before {stage_id!r}"
    kinds = registry.providers(need)
    if kinds:
        return f"a {' or '.join(kinds)} stage before {stage_id!r} (it provides {need!r})"
    return f"a stage that provides {need!r} before {stage_id!r} (no registered stage does)"


def _model_before(stages: list[ResolvedStage], index: int, registry: Registry) -> ModelEntry | None:
    """The architecture of the model that stage ``index`` works on."""
    return architecture([s for s in stages if s.index < index], registry)


def _unknown_terms(
    params: Params, model: ModelEntry | None, under: KeyPath = ()
) -> dict[str, tuple[str, ...]]:
    """The loss terms ``params`` set (at a key under ``under``) that ``model`` lacks, each
    with its key path in the params; none when the model names no terms to check against."""
    if model is None or not model.loss_weights:
        return {}
    return {
        term: at for term, at in params.loss_weight_paths().items()
        if at[: len(under)] == under and term not in model.loss_weights
    }


def cross_stage_problems(
    stages: list[ResolvedStage], registry: Registry, doc: YamlDocument
) -> list[Problem]:
    """Checks that need more than one stage: the loss terms a stage's params set
    (:meth:`~dlpipe.params.Params.loss_terms`) against its model's."""
    problems: list[Problem] = []
    for stage in stages:
        if not stage.params.loss_weight_paths():
            continue
        model = _model_before(stages, stage.index, registry)
        for term, at in _unknown_terms(stage.params, model).items():
            assert model is not None
            path: KeyPath = ("stages", stage.index, "params", *at)
            problems.append(
                Problem(
                    path,
                    f"model {model.name!r} has no loss term {term!r}",
                    doc.locate(path),
                    suggestions=close_matches(term, model.loss_weights),
                    available=list(model.loss_weights),
                    label=stage.id,
                )
            )
    return problems


def driver_problems(
    stages: list[ResolvedStage], registry: Registry, doc: YamlDocument
) -> list[Problem]:
    """At most one stage may drive the stages before it, and it needs some."""
    problems: list[Problem] = []
    drivers = []
    for stage in stages:
        entry = registry.lookup_stage(stage.kind, stage.use)
        if entry is not None and entry.drives_previous:
            drivers.append(stage)
    for extra in drivers[1:]:
        path: KeyPath = ("stages", extra.index, "kind")
        problems.append(Problem(
            path, f"only one stage may run the stages before it; {drivers[0].id!r} already does",
            doc.locate(path), expected="a single tune stage", label=extra.id))
    if drivers and drivers[0].index == 0:
        path = ("stages", 0, "kind")
        problems.append(Problem(
            path, f"stage {drivers[0].id!r} runs the stages before it, but it is the first",
            doc.locate(path), expected="data, model and train stages before it",
            label=drivers[0].id))
    return problems


def reference_problems(
    stages: list[ResolvedStage], registry: Registry, doc: YamlDocument
) -> list[Problem]:
    """Check the dotted paths that params name (a search space): each must point into
    an earlier stage, and that stage must accept every value it may be given."""
    problems: list[Problem] = []
    data = doc.data
    by_index = {s.index: s for s in stages}
    for stage in stages:
        for dotted, values in stage.params.spec_references().items():
            where = _key_naming(doc, stage.index, dotted)
            label = f"{stage.id}: {dotted}"

            def problem(message: str, **kw: Any) -> None:
                problems.append(Problem(where, message, doc.locate(where), label=label, **kw))  # noqa: B023

            try:
                path = resolve_path(data, dotted)
            except DlpipeError as exc:
                head = dotted.split(".")[0]
                choices = [k for k in TOP_LEVEL_KEYS if k != "stages"] + stage_ids(data)
                problem(
                    f"path {dotted!r} points nowhere: {head!r} is neither a top-level key "
                    "nor a stage name" if head not in choices else str(exc),
                    suggestions=close_matches(head, choices), available=choices,
                )
                continue
            if path[0] != "stages":
                if path[0] != "seed":
                    problem(f"path {dotted!r} cannot be searched", expected="a stage parameter or seed")
                continue
            target = by_index.get(int(path[1]))
            if int(path[1]) >= stage.index:
                problem(
                    f"path {dotted!r} points into stage {dotted.split('.')[0]!r}, which does "
                    f"not run before {stage.id!r}",
                    expected=f"a parameter of a stage listed before {stage.id!r}",
                )
                continue
            if target is None:
                continue  # that stage has problems of its own
            entry = registry.lookup_stage(target.kind, target.use)
            assert entry is not None
            rel = path[3:]
            if path[2] == "use":
                names = registry.stage_names(target.kind)
                for value in values:
                    if value not in names:
                        problem(f"path {dotted!r}: {value!r} is not a registered {target.kind}",
                                suggestions=close_matches(str(value), names), available=names)
                continue
            raw_stage = data["stages"][target.index]
            model = _model_before(stages, target.index, registry)
            unknown: dict[str, None] = {}  # loss terms the values set that the model lacks
            for value in values:
                raw_params = copy.deepcopy(raw_stage.get("params") or {})
                try:
                    set_path(raw_params, rel, value)
                    params = entry.params.model_validate(raw_params)
                except DlpipeError as exc:
                    problem(f"path {dotted!r}: {exc}")
                    break
                except ValidationError as exc:
                    first = pydantic_problems(exc, entry.params, (), YamlDocument(raw_params, {}, ""))[0]
                    bad = format_path(first.path)
                    problem(
                        f"path {dotted!r} with value {value!r}: {bad}: {first.message}",
                        expected=first.expected, suggestions=first.suggestions,
                        available=first.available,
                    )
                    break
                unknown.update(dict.fromkeys(_unknown_terms(params, model, rel)))
            for term in unknown:
                assert model is not None
                problem(
                    f"path {dotted!r}: model {model.name!r} has no loss term {term!r}",
                    suggestions=close_matches(term, model.loss_weights),
                    available=list(model.loss_weights),
                )
    return problems


def _key_naming(doc: YamlDocument, index: int, dotted: str) -> KeyPath:
    """The key path, inside stage ``index``'s params, of the key spelled ``dotted``."""
    base = ("stages", index, "params")
    for path in doc.positions:
        if path[:3] == base and path and path[-1] == dotted:
            return path
    return base

