"""The run context: what stages share while a pipeline runs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dlpipe.data import DataBundle
    from dlpipe.plugins import PluginHost
    from dlpipe.spec import ResolvedSpec, ResolvedStage


@dataclass
class RunContext:
    """State shared by the stages of one pipeline run.

    Stages communicate through it: the data stage sets :attr:`data`, the model stage
    :attr:`model`, the train stage :attr:`history`, and every stage may report
    metrics and artifacts through :meth:`log_metrics` and :meth:`log_artifact`, which
    call the ``on_metrics`` and ``on_artifact`` hooks.
    """

    spec: ResolvedSpec
    plugins: PluginHost
    run_dir: Path
    strategy: Any = None
    data: DataBundle | None = None
    model: Any = None
    #: Every model built so far in this run, by model stage id (a later model stage,
    #: latent diffusion for one, may use an earlier stage's trained model).
    models: dict[str, Any] = field(default_factory=dict)
    history: dict[str, list[float]] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    run_id: str | None = None
    stage: ResolvedStage | None = None
    #: The enclosing run when this one is nested in it (a tuning trial in its study).
    parent: RunContext | None = None
    #: Name for the tracked run (default: the spec's name).
    run_name: str | None = None
    #: Tags for the tracked run; tracking writes them at the start and again at the end.
    tags: dict[str, str] = field(default_factory=dict)
    #: A stage sets this to end the run successfully after it, skipping later stages.
    finished: bool = False
    #: ``dlpipe run --smoke``: an end-to-end check, not an experiment. Train stages run
    #: one short epoch, tuners two trials; stages with long loops should cut them too.
    smoke: bool = False
    #: ``dlpipe run --restart``: ignore what an earlier, unfinished run of this spec
    #: left (its backup is set aside, not deleted) and start a new tracked run.
    restart: bool = False
    #: ``dlpipe run --resume-older``: when the newest resume snapshot is damaged, set
    #: it aside and continue from the older good one.
    resume_older: bool = False
    #: Folders of resume state (train stages' backups) that the engine removes once
    #: the whole run has finished: until then a re-run resumes from them.
    discard_on_success: list[Path] = field(default_factory=list)
    #: Free space for plugins; key it by your plugin's name.
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def hook(self) -> Any:
        return self.plugins.hook

    @property
    def seed(self) -> int:
        return self.spec.settings.seed

    def model_entry(self) -> Any:
        """The registry entry of the architecture of :attr:`model`: that of the last stage
        that builds a model, up to the current stage (or in the whole spec, between
        stages), if any (see :func:`dlpipe.spec.architecture`)."""
        from dlpipe.spec import architecture

        stages = list(self.spec.stages)
        if self.stage is not None:
            stages = stages[: self.stage.index + 1]
        return architecture(stages, self.plugins.registry)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        clean = {k: float(v) for k, v in metrics.items()}
        if step is None:
            self.metrics.update(clean)
        self.hook.on_metrics(context=self, stage=self.stage, metrics=clean, step=step)

    def log_artifact(self, path: str | Path, artifact_path: str = "") -> None:
        self.hook.on_artifact(
            context=self, stage=self.stage, path=str(path), artifact_path=artifact_path
        )

    def log_figure(self, figure: Any, filename: str, artifact_path: str = "plots") -> Path:
        """Save a matplotlib figure under the run folder as PNG, close it, log it."""
        import matplotlib.pyplot as plt

        out = self.run_dir / artifact_path / filename
        out.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(out, dpi=100, bbox_inches="tight")
        plt.close(figure)
        self.log_artifact(out, artifact_path)
        return out
