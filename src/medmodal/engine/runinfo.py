"""Self-describing run folders: ``RUN/run.json`` records what using the model needs, without its training data.

``run.json`` holds the method, the task (region segmentation, label segmentation or classification, with the
regions, label values or class names), the modality order, the preprocessing (orientation, target spacing,
normalisation), the network's registry name and arguments, the inference settings, and where the training data
came from (for the warning when a model trained on the synthetic phantom meets other data). ``evaluate`` and
``predict`` read it and dispatch to the method's plug-in.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, Literal

from medmodal.atomic import atomic_write_text
from medmodal.engine.recipe import Recipe, RecipeError, load_recipe
from medmodal.engine.run import RunError

RUN_INFO = "run.json"
FORMAT_VERSION = 1
TaskKind = Literal["regions", "labels", "classification", "synthesis", "multitask", "pretraining"]


@dataclass(frozen=True)
class TaskInfo:
    """What the model predicts.

    Attributes:
        kind: ``"regions"`` (one sigmoid channel per possibly overlapping region, e.g. BraTS WT/TC/ET),
            ``"labels"`` (softmax over label values, channel ``c`` is ``label_values[c]``) or
            ``"classification"`` (softmax over ``class_names``), ``"synthesis"`` (one image channel per
            modality: the network fills missing modalities), ``"multitask"`` (``regions`` segmented and
            ``class_names`` classified by one network) or ``"pretraining"`` (a self-supervised encoder: no task head;
            fine-tune it with ``train --from``).
        regions: region name → label values (``"regions"``).
        label_names: label value → name, for the label map written by ``predict``.
        label_values: the label value of each output channel (``"labels"``).
        class_names: the name of each class (``"classification"``).
    """

    kind: TaskKind
    regions: dict[str, list[int]] = field(default_factory=dict)
    label_names: dict[int, str] = field(default_factory=dict)
    label_values: list[int] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)

    @property
    def out_channels(self) -> int:
        """Output channels of a segmentation network for this task (0 for classification and synthesis)."""
        return {"regions": len(self.regions), "labels": len(self.label_values), "classification": 0,
                "synthesis": 0, "multitask": len(self.regions), "pretraining": 0}[self.kind]

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> TaskInfo:
        return cls(kind=doc["kind"], regions={k: list(v) for k, v in doc.get("regions", {}).items()},
                   label_names={int(k): v for k, v in doc.get("label_names", {}).items()},
                   label_values=[int(v) for v in doc.get("label_values", [])],
                   class_names=list(doc.get("class_names", [])))


@dataclass(frozen=True)
class RunInfo:
    """The contents of ``run.json`` (see the module docstring)."""

    method: str
    task: TaskInfo
    spatial_dims: int
    modalities: list[str]
    preprocessing: dict[str, Any]
    network: dict[str, Any]
    inference: dict[str, Any]
    training_data: dict[str, Any]
    #: ``train.init_from``: the source run and the parameters copied from it / left as initialised
    initialised_from: dict[str, Any] | None = None
    created: str = field(default_factory=lambda: date.today().isoformat())
    format: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=str) + "\n"

    def preprocessing_options(self) -> dict[str, Any]:
        """The keyword arguments of :func:`~medmodal.data.preprocess.preprocess_case` that repeat the recorded
        preprocessing: ``target_spacing`` and ``histogram_clip`` (``None`` in runs recorded without them)."""
        from medmodal.data.preprocess import HistogramClip

        spacing = self.preprocessing.get("target_spacing")
        return {"target_spacing": tuple(spacing) if spacing else None,
                "histogram_clip": HistogramClip.from_dict(self.preprocessing.get("histogram_clip"))}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> RunInfo:
        return cls(**{**doc, "task": TaskInfo.from_json(doc["task"])})


def training_data_description(recipe: Recipe, *, dataset_name: str, synthetic: bool) -> dict[str, Any]:
    """Where the training data came from: the phantom's settings or the data set's path and name."""
    d = recipe.data
    if d.path is None:
        return {"kind": "phantom", "synthetic": True, "dataset_name": dataset_name,
                "phantom": d.phantom.model_dump(mode="json")}
    return {"kind": "path", "synthetic": bool(synthetic), "dataset_name": dataset_name, "path": str(d.path),
            "format": d.format}


def write_run_info(run_dir: Path, info: RunInfo) -> Path:
    """Write ``run_dir/run.json`` atomically."""
    return atomic_write_text(Path(run_dir) / RUN_INFO, info.to_json())


@dataclass(frozen=True)
class LoadedRun:
    """A trained run folder: where it is, its resolved recipe and its ``run.json``."""

    dir: Path
    recipe: Recipe
    info: RunInfo

    @property
    def split_file(self) -> Path:
        return self.dir / "split.json"

    def split(self, name: str) -> list[str]:
        """Case ids of ``name`` (``"train"`` or ``"val"``) from ``split.json``."""
        if not self.split_file.is_file():
            raise RunError(f"{self.split_file}: not found; the run did not finish (resume it) or pass --split all")
        return list(json.loads(self.split_file.read_text(encoding="utf-8"))[name])

    def split_hash(self) -> str:
        """The first 12 hex digits of the SHA-1 of ``split.json``'s sorted train and val ids: results files quote
        it so that two tables can be checked to come from the same split."""
        import hashlib

        ids = {name: sorted(self.split(name)) for name in ("train", "val")}
        return hashlib.sha1(json.dumps(ids, sort_keys=True).encode()).hexdigest()[:12]

    def data_warning(self, *, data_synthetic: bool) -> str | None:
        """The warning to print once when this run's model meets data it was not trained on: a model trained
        only on synthetic data applied to data that is not synthetic. ``None`` when there is nothing to say."""
        training = self.info.training_data
        if not training.get("synthetic") or data_synthetic:
            return None
        what = ("the synthetic phantom" if training.get("kind") == "phantom"
                else f"synthetic data ({training.get('dataset_name') or training.get('path')})")
        return (f"this model ({self.dir}) was trained only on {what}; its output on real scans is meaningless. "
                "Train on labelled scans like yours (recipe data.path) before trusting it.")

    def network(self) -> Any:
        """The trained network (eval mode) from ``weights/``."""
        from medmodal.engine.run import load_network

        return load_network(self.dir / "weights")


def load_run(run_dir: Path | str) -> LoadedRun:
    """Read a run folder's recipe and ``run.json``; a clear :class:`RunError` when it is not a finished run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: no such run folder")
    path = run_dir / RUN_INFO
    if not path.is_file():
        hint = ("it was trained by an older medmodal (retrain it)" if (run_dir / "recipe.yaml").is_file()
                else "it is not a medmodal run folder")
        raise RunError(f"{path}: not found; {hint}")
    try:
        info = RunInfo.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError) as err:
        raise RunError(f"{path}: unreadable run description ({err}); retrain the run") from None
    if info.format > FORMAT_VERSION:
        raise RunError(f"{path}: written by a newer medmodal (format {info.format}); upgrade medmodal")
    try:
        recipe = load_recipe(run_dir / "recipe.yaml")
    except RecipeError as err:
        raise RunError(f"{run_dir}: its recipe no longer validates: {err}") from None
    return LoadedRun(dir=run_dir, recipe=recipe, info=info)
