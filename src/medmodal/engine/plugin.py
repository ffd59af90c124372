"""Method plug-ins: the contract between the generic engine and one method's package, and their registry.

A method lives in its own package ``medmodal/methods/<name>/`` whose ``__init__`` creates one
:class:`MethodPlugin` subclass instance and passes it to :func:`register_method`. The engine finds the built-in
packages by listing ``medmodal.methods`` and third-party ones through the ``medmodal.methods`` entry-point group,
so adding a method touches no generic file. Everything the engine asks of a method goes through this class:

* ``config``: the pydantic model of the recipe's ``method:`` section (``name`` is its discriminator);
* :meth:`check_recipe`: checks that involve other sections (raise ``ValueError`` with a message naming fields);
* :meth:`build`: the Lightning system, data module, network and what the run folder records about the task;
* :meth:`evaluate`, :meth:`predict`, :meth:`synthesize`, :meth:`fuse`: the inference commands, on a
  self-describing run folder;
* :meth:`add_commands`: sub-commands the method adds to ``medmodal``;
* :meth:`contract_recipe`: a tiny recipe per spatial dimension, which the method contract test trains, resumes,
  evaluates and predicts with through the CLI.

An operation a method does not offer raises :class:`~medmodal.engine.run.RunError` with one line (exit code 2).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    import lightning as L
    import typer

    from medmodal.data.case import CaseRecord, DatasetInfo
    from medmodal.engine.recipe import Recipe
    from medmodal.engine.runinfo import LoadedRun, TaskInfo

ENTRY_POINT_GROUP = "medmodal.methods"


class MethodSection(BaseModel):
    """Base of every method's recipe section: unknown keys are errors; ``name`` selects the plug-in."""

    model_config = ConfigDict(extra="forbid")

    name: str


@dataclass
class PretrainRequest:
    """What ``medmodal pretrain`` asks a method for (:meth:`MethodPlugin.pretrain`).

    Attributes:
        recipes: recipe files or built-in names given on the command line (the method's defaults when empty).
        out: the output folder (``None``: the method's default).
        stage: a stage to add (methods that pretrain in stages), or ``None``.
        data: the data of that stage or pretraining (a folder or manifest), or ``None``.
        from_run: an existing run to continue from, or ``None``.
        overrides: dotted ``--set`` overrides of every recipe.
        fast: a tiny smoke version.
        overwrite: replace finished runs in ``out``.
    """

    recipes: tuple[str, ...] = ()
    out: Path | None = None
    stage: str | None = None
    data: Path | None = None
    from_run: Path | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    fast: bool = False
    overwrite: bool = False


@dataclass
class Training:
    """What :meth:`MethodPlugin.build` returns for :func:`medmodal.engine.train.train`.

    Attributes:
        system: the Lightning module; its ``network`` attribute is the pure model saved to ``weights/``.
        data: the data module; after ``setup`` it exposes ``train_ids`` and ``val_ids`` (``split.json``).
        network_name, network_kwargs: the registry name and constructor arguments of ``system.network``.
        task: what the model predicts (recorded in ``run.json``).
        modalities: the channel order the model reads.
        preprocessing: how inputs are brought onto the model's grid (recorded in ``run.json``).
        inference: sliding-window settings and post-processing used by ``evaluate`` and ``predict``.
        callbacks: extra callbacks (run on every rank; write files on rank 0 only).
        training_data: where the training data came from, for ``run.json``, when it is not the recipe's ``data``
            section (``None``: described from ``data``).
    """

    system: L.LightningModule
    data: L.LightningDataModule
    network_name: str
    network_kwargs: dict[str, Any]
    task: TaskInfo
    modalities: tuple[str, ...]
    preprocessing: dict[str, Any]
    inference: dict[str, Any]
    callbacks: list[L.Callback] = field(default_factory=list)
    training_data: dict[str, Any] | None = None


class MethodPlugin:
    """One method. Subclasses set the class attributes and override what the method offers."""

    name: ClassVar[str]
    config: ClassVar[type[MethodSection]]
    summary: ClassVar[str] = ""
    #: spatial dimensions the method trains in (the contract test runs each).
    spatial_dims: ClassVar[tuple[int, ...]] = (2, 3)
    #: the method used when a recipe has no ``method`` section (exactly one plug-in sets it).
    default: ClassVar[bool] = False
    #: the per-case metrics ``evaluate`` writes to its CSV files (column-name prefix → valid range); the method
    #: contract test checks them.
    evaluation_metrics: ClassVar[dict[str, tuple[float, float]]] = {"dice": (0.0, 1.0)}
    #: whether :meth:`evaluate` takes ``against`` (another loaded run of the method, scored on the same cases;
    #: ``medmodal evaluate RUN --against OTHER``).
    evaluates_against: ClassVar[bool] = False
    #: the method ``medmodal pretrain`` runs when neither a recipe nor ``--from`` names one (one plug-in sets it).
    default_pretraining: ClassVar[bool] = False
    #: whether the method's data module honours ``data.label_fraction`` (a recipe asking for fewer labels from a
    #: method that does not is refused rather than silently trained on all of them).
    honours_label_fraction: ClassVar[bool] = False

    # -- recipes -----------------------------------------------------------------------------------------
    def check_recipe(self, recipe: Recipe) -> None:
        """Cross-section checks of a validated recipe; raise ``ValueError`` naming the fields."""

    def ddp_find_unused_parameters(self, recipe: Recipe) -> bool:
        """Whether DDP must look for parameters without a gradient (e.g. encoders of missing modalities)."""
        return False

    # -- training ----------------------------------------------------------------------------------------
    def build(self, recipe: Recipe) -> Training:
        """The system, data and description of a fresh run of ``recipe``."""
        raise NotImplementedError

    def initial_weights(self, recipe: Recipe, source: LoadedRun) -> dict[str, Any]:
        """The tensors ``train.init_from`` offers to this recipe's network, named as in its ``state_dict``:
        by default the source run's network weights as they are; a method whose pretrained and fine-tuned networks
        name their parts differently maps the names here."""
        return dict(source.network().state_dict())

    # -- inference on a run folder ------------------------------------------------------------------------
    def evaluate(self, run: LoadedRun, *, out_dir: Path, split: str, data: Path | None, features: bool,
                 progress: bool, model_name: str | None = None) -> Path:
        """Evaluate ``run`` and write ``out_dir/report.md`` (returned)."""
        raise self.not_offered("evaluate")

    def predict(self, run: LoadedRun, records: Sequence[CaseRecord], out_dir: Path, *, overwrite: bool,
                progress: bool) -> list[Path]:
        """Apply ``run``'s model to ``records``; returns the written files."""
        raise self.not_offered("predict")

    def synthesize(self, run: LoadedRun, records: Sequence[CaseRecord], out_dir: Path, *, source: Path | None,
                   source_format: str, source_info: DatasetInfo | None, options: dict[str, Any], overwrite: bool,
                   progress: bool) -> Path:
        """Fill the missing modalities of ``records`` (read from data set ``source`` in ``source_format``, whose
        :class:`DatasetInfo` the command already read is ``source_info``, or
        ``--image`` files when ``source`` is ``None``) and write a complete data set to ``out_dir`` in the
        input's layout; ``options`` holds the sampler settings given on the command line (``None``: the run's).
        Returns ``out_dir``."""
        raise self.not_offered("synthesize")

    def pretrain(self, request: PretrainRequest) -> Path:
        """Self-supervised pretraining (``medmodal pretrain``): train the run(s) ``request`` asks for and return
        the report written."""
        raise self.not_offered("pretrain")

    def fuse(self, run: LoadedRun, out_dir: Path, *, overwrite: bool) -> list[Path]:
        """Fuse the candidate labels of ``run`` (label-fusion methods); returns the written files."""
        raise self.not_offered("fuse --run")

    # -- command line and tests ---------------------------------------------------------------------------
    def add_commands(self, app: typer.Typer) -> None:
        """Add the method's own sub-commands to the ``medmodal`` application."""

    def contract_recipe(self, spatial_dims: int) -> dict[str, Any]:
        """A recipe (dict) that trains in seconds on the phantom, for the method contract test."""
        raise NotImplementedError

    # -- helpers ------------------------------------------------------------------------------------------
    def offers(self, operation: str) -> bool:
        """Whether the plug-in overrides the inference operation ``operation`` (``predict``, ``synthesize``,
        ``fuse``, ``evaluate``, ``pretrain``)."""
        return getattr(type(self), operation) is not getattr(MethodPlugin, operation)

    def not_offered(self, operation: str) -> Exception:
        from medmodal.engine.run import RunError

        return RunError(f"{operation} is not offered by method {self.name!r} (a {self.summary or self.name} run)")


_REGISTRY: dict[str, MethodPlugin] = {}
_LOADED = False


def register_method(plugin: MethodPlugin) -> MethodPlugin:
    """Add ``plugin`` to the registry (its package's ``__init__`` calls this once)."""
    name = plugin.name
    fields = plugin.config.model_fields
    if "name" not in fields or fields["name"].default != name:
        raise ValueError(f"method {name!r}: its config {plugin.config.__name__} needs `name: Literal[{name!r}]` "
                         f"with that default")
    if name in _REGISTRY and type(_REGISTRY[name]) is not type(plugin):
        raise ValueError(f"method {name!r} is registered twice ({type(_REGISTRY[name]).__name__}, "
                         f"{type(plugin).__name__})")
    _REGISTRY[name] = plugin
    return plugin


def load_plugins() -> None:
    """Import every built-in method package and every ``medmodal.methods`` entry point (once)."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    import medmodal.methods as builtin

    for info in sorted(pkgutil.iter_modules(builtin.__path__), key=lambda m: m.name):
        if info.ispkg:
            importlib.import_module(f"{builtin.__name__}.{info.name}")
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        ep.load()


def method_names() -> list[str]:
    """The registered method names, sorted."""
    load_plugins()
    return sorted(_REGISTRY)


def get_method(name: str) -> MethodPlugin:
    """The plug-in registered as ``name``; ``KeyError`` lists the known names."""
    load_plugins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; registered: {', '.join(sorted(_REGISTRY))}") from None


def default_method() -> MethodPlugin:
    """The plug-in a recipe without a ``method`` section uses."""
    load_plugins()
    defaults = [p for p in _REGISTRY.values() if p.default]
    if len(defaults) != 1:
        raise RuntimeError(f"exactly one method must be the default, found {[p.name for p in defaults]}")
    return defaults[0]
