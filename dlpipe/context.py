"""The run context: what stages share while a pipeline runs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dlpipe.errors import DlpipeError

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
    #: On a worker of a multi-worker cluster that is not the chief: the chief's run
    #: folder (:attr:`run_dir` is then a folder of this worker's own inside it, and the
    #: chief's resume backup is read from here). ``None`` everywhere else.
    chief_run_dir: Path | None = None
    _chief: tuple[Any, bool] | None = field(default=None, init=False, repr=False)

    @property
    def hook(self) -> Any:
        return self.plugins.hook

    @property
    def seed(self) -> int:
        return self.spec.settings.seed

    @property
    def is_chief(self) -> bool:
        """Whether this process is the chief of its cluster: the one process that tracks
        the run, logs metrics, figures and artifacts and saves the model. ``True``
        without a cluster (one process: every strategy but ``multi_worker``).

        Read from the strategy's cluster resolver (the ``chief`` task, else worker 0).
        Before the strategy exists (``before_run``), the strategy params say, through
        their ``worker_name()`` (``None`` on the chief), if they have one.
        """
        if self.parent is not None:
            return self.parent.is_chief
        if self.strategy is None:
            params = getattr(self.spec, "strategy_params", None)
            worker_name = getattr(params, "worker_name", None)
            try:
                return worker_name is None or worker_name() is None
            except DlpipeError:  # no cluster configured (`dlpipe predict` on the spec)
                return True
        if self._chief is None or self._chief[0] is not self.strategy:
            self._chief = (self.strategy, _resolver_is_chief(
                getattr(self.strategy, "cluster_resolver", None)))
        return self._chief[1]

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
        """Report metrics (``on_metrics``); final ones (no ``step``) are also kept in
        :attr:`metrics`. Only the chief reports; every worker keeps its own."""
        clean = {k: float(v) for k, v in metrics.items()}
        if step is None:
            self.metrics.update(clean)
        if self.is_chief:
            self.hook.on_metrics(context=self, stage=self.stage, metrics=clean, step=step)

    def log_artifact(self, path: str | Path, artifact_path: str = "") -> None:
        """Report a file (``on_artifact``); nothing on a worker that is not the chief."""
        if not self.is_chief:
            return
        self.hook.on_artifact(
            context=self, stage=self.stage, path=str(path), artifact_path=artifact_path
        )

    def log_figure(self, figure: Any, filename: str, artifact_path: str = "plots") -> Path:
        """Save a matplotlib figure under the run folder as PNG, close it, log it. A
        worker that is not the chief only closes it; the path is returned either way."""
        import matplotlib.pyplot as plt

        out = self.run_dir / artifact_path / filename
        if not self.is_chief:
            plt.close(figure)
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(out, dpi=100, bbox_inches="tight")
        plt.close(figure)
        self.log_artifact(out, artifact_path)
        return out


def _resolver_is_chief(resolver: Any) -> bool:
    """The chief of a ``tf.distribute`` cluster resolver's cluster: its ``chief`` task,
    else worker 0; ``True`` without a resolver or a task (no cluster)."""
    task_type = getattr(resolver, "task_type", None) if resolver is not None else None
    if not task_type or task_type == "chief":
        return True
    if task_type != "worker" or int(resolver.task_id or 0) != 0:
        return False
    return "chief" not in resolver.cluster_spec().as_dict()
