"""Recipes: the YAML schema of a run, validated by pydantic.

Every section forbids unknown keys, so a typo (``max_step``) is an error that names the field instead of a
silently ignored setting. ``load_recipe`` turns validation errors into :class:`RecipeError` messages like
``recipe.yaml: train.max_step: unknown field``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class RecipeError(ValueError):
    """An invalid recipe; the message names the file and the field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class PhantomConfig(_Section):
    """The embedded synthetic phantom used when ``data.path`` is not set."""

    cases: int = Field(40, ge=2)
    spatial_dims: Literal[2, 3] = 3
    size: int | list[int] = 64
    spacing: list[float] | None = None
    seed: int = 0
    missing_rate: float = Field(0.0, ge=0.0, lt=1.0)


class LabelNoiseConfig(_Section):
    """Synthetic candidate labels (DeepSTAPLE experiment I): seeded disturbances of each target's true label.

    See :mod:`medmodal.transforms.label_noise`; each label's Dice against the clean one is its known quality.
    """

    labels_per_target: int = Field(5, ge=1)
    kinds: list[Literal["elastic", "morph", "shift", "flip_roll", "empty"]] = [
        "elastic", "morph", "shift", "flip_roll", "empty"
    ]
    max_severity: float = Field(1.0, gt=0.0, le=2.0)
    seed: int = Field(0, ge=0)

    @field_validator("kinds")
    @classmethod
    def _some_kind(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("kinds must name at least one disturbance")
        return v


class CandidateLabelsConfig(_Section):
    """DeepSTAPLE inputs: several candidate (e.g. atlas-registered) binary labels per target image.

    Exactly one source: ``manifest``, a registration manifest (``medmodal register``'s ``manifest.csv``: columns
    ``target, atlas, label``; relative paths start at its folder) of labels registered onto the cases of
    ``data.path``, or ``noise``, synthetic labels disturbed from the targets' own labels. The targets are the
    cases of ``data.path`` (or the phantom); their labels, where present, are the reference. ``foreground`` lists
    the label values that are foreground (default: every non-zero value).
    """

    manifest: Path | None = None
    noise: LabelNoiseConfig | None = None
    foreground: list[int] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> CandidateLabelsConfig:
        if (self.manifest is None) == (self.noise is None):
            raise ValueError("set exactly one of manifest (registered labels) and noise (synthetic labels)")
        if self.foreground is not None and (not self.foreground or min(self.foreground) < 1):
            raise ValueError(f"foreground must list positive label values, got {self.foreground}")
        return self


class DataConfig(_Section):
    path: Path | None = None
    format: Literal["auto", "brats", "nnunet", "manifest"] = "auto"
    phantom: PhantomConfig = PhantomConfig()
    modalities: list[str] | None = None
    target_spacing: list[float] | None = None
    cache_dir: Path | None = None
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    patch_size: list[int] = [48, 48, 48]
    batch_size: int = Field(2, ge=1)
    foreground_fraction: float = Field(1 / 3, ge=0.0, le=1.0)
    num_workers: int = Field(1, ge=0)
    candidates: CandidateLabelsConfig | None = None  # DeepSTAPLE only

    @field_validator("patch_size")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if not v or any(s < 1 for s in v):
            raise ValueError(f"patch_size must be positive sizes, got {v}")
        return v


class ModelConfig(_Section):
    name: str = "unet"
    kwargs: dict[str, Any] = {"channels": [16, 32, 64, 128]}


class ZeroFillMethod(_Section):
    """The zero-fill baseline: missing modalities are zero channels; random modality dropout in training."""

    name: Literal["zero_fill"] = "zero_fill"
    modality_dropout: float = Field(0.5, ge=0.0, le=1.0)
    lambda_dice: float = 1.0
    lambda_bce: float = 1.0


class ShaSpecPhase(_Section):
    """One training phase: ``steps`` optimiser steps seeing all modalities (``full``) or random subsets."""

    steps: int = Field(ge=1)
    sampler: Literal["full", "random"] = "random"


class ShaSpecMethod(_Section):
    """ShaSpec (Wang et al., CVPR 2023): shared + specific encoders, DAO and DCO auxiliary losses.

    Defaults follow the paper where it is explicit (``../shared/methods/shaspec.md`` §2.5); the released
    code's behaviour is one switch away.
    """

    name: Literal["shaspec"] = "shaspec"
    task: Literal["segmentation", "classification"] = "segmentation"
    alpha: float = Field(0.1, ge=0.0)  # distribution alignment (DAO) weight
    beta: float = Field(0.02, ge=0.0)  # domain classification (DCO) weight
    dao_form: Literal["l1_pairs", "mse_pairs", "kl_softmax_pairs"] = "l1_pairs"
    dao_pairs: Literal["cyclic", "all"] = "cyclic"
    aux_on_missing: bool = False
    subset_sampler: Literal["by_size", "uniform"] = "by_size"
    sample_per: Literal["sample", "batch"] = "sample"
    dedicated: list[str] | None = None  # a fixed modality subset: "dedicated" training and evaluation
    phases: list[ShaSpecPhase] | None = None  # None: random subsets throughout
    phase_schedule: Literal["continuous", "restart"] = "continuous"  # restart: each phase decays to 0 (code)
    lambda_dice: float = 1.0
    lambda_bce: float = 1.0

    @field_validator("dedicated")
    @classmethod
    def _non_empty(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and not v:
            raise ValueError("dedicated must name at least one modality (or be left out)")
        return v


class DeepStapleMethod(_Section):
    """DeepSTAPLE (Weihsbach et al., WBIR 2022): one learnable data parameter per registered label."""

    name: Literal["deepstaple"] = "deepstaple"
    dp_update: Literal["ool", "inline"] = "ool"
    risk_regularization: bool = True
    fixed_weighting: Literal["log_fg", "off"] = "log_fg"
    dp_loss_class_weights: bool = False
    dp_lr: float = Field(0.1, gt=0)
    class_weight_exponent: float = Field(0.35, ge=0)
    # "schedule": train.schedule per step; "faithful": the official code's exponential decay (gamma per batch,
    # only in epochs that are multiples of lr_decay_every; see methods/deepstaple.md §2.6)
    lr_decay: Literal["schedule", "faithful"] = "schedule"
    lr_gamma: float = Field(0.99, gt=0, le=1)
    lr_decay_every: int = Field(10, ge=1)


MethodConfig = Annotated[ZeroFillMethod | ShaSpecMethod | DeepStapleMethod, Field(discriminator="name")]


class TrainConfig(_Section):
    max_steps: int = Field(600, ge=1)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    momentum: float = Field(0.99, ge=0, lt=1)
    schedule: Literal["poly", "cosine", "constant"] = "poly"
    warmup_steps: int = Field(0, ge=0)  # linear warm-up of the learning rate
    val_every_steps: int = Field(100, ge=1)
    checkpoint_every_steps: int = Field(50, ge=1)
    devices: int = Field(1, ge=1)
    num_nodes: int = Field(1, ge=1)
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    precision: Literal["32-true", "16-mixed", "bf16-mixed"] = "32-true"
    threads: int | None = 2
    channels_last: bool = True
    progress: bool = True


class EvalConfig(_Section):
    roi_size: list[int] | None = None  # sliding-window size for evaluation/prediction; None = data.patch_size
    overlap: float = Field(0.25, ge=0.0, lt=1.0)
    sw_batch_size: int = Field(2, ge=1)
    max_cases: int | None = None
    # ShaSpec* post-processing: a predicted ET smaller than this many voxels becomes necrosis (released code: 500)
    et_min_voxels: int | None = Field(None, ge=1)


class Recipe(_Section):
    """A whole run: data, model, method, training and evaluation settings."""

    name: str = "run"
    seed: int = 0
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    method: MethodConfig = Field(default_factory=ZeroFillMethod)
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        dims = self.spatial_dims
        if len(self.data.patch_size) != dims:
            raise ValueError(f"data.patch_size has {len(self.data.patch_size)} sizes but the data is {dims}D")
        if self.eval.roi_size is not None and len(self.eval.roi_size) != dims:
            raise ValueError(f"eval.roi_size has {len(self.eval.roi_size)} sizes but the data is {dims}D")
        phases = getattr(self.method, "phases", None)
        if phases and sum(p.steps for p in phases) != self.train.max_steps:
            total = " + ".join(str(p.steps) for p in phases)
            raise ValueError(f"method.phases last {total} steps but train.max_steps is {self.train.max_steps}")
        return self

    @property
    def eval_roi_size(self) -> list[int]:
        """Sliding-window size at evaluation and prediction time."""
        return self.eval.roi_size or self.data.patch_size

    @property
    def spatial_dims(self) -> int:
        """2 or 3: the phantom's, or the length of ``patch_size`` for data on disk."""
        return self.data.phantom.spatial_dims if self.data.path is None else len(self.data.patch_size)


def _format_validation(err: ValidationError, where: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<recipe>"
        msg = "unknown field (check the spelling)" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"{where}: {loc}: {msg}")
    return "\n".join(lines)


def recipe_from_dict(data: dict[str, Any], *, where: str = "<recipe>") -> Recipe:
    """Validate a nested dict as a :class:`Recipe` (errors name the field)."""
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(_format_validation(err, where)) from None


def load_recipe(path: Path | str, *, overrides: dict[str, Any] | None = None) -> Recipe:
    """Read a YAML recipe, apply dotted ``overrides`` (``{"train.max_steps": 10}``) and validate it."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections (data, model, train, ...)")
    return recipe_from_dict(apply_overrides(data, overrides or {}), where=str(path))


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys in a nested dict (a copy); intermediate sections are created as needed."""
    out: dict[str, Any] = yaml.safe_load(yaml.safe_dump(data)) or {}
    for key, value in overrides.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise RecipeError(f"override {key!r}: {p!r} is not a section")
        node[leaf] = value
    return out


def dump_recipe(recipe: Recipe) -> str:
    """The recipe as YAML with every default resolved (what a run folder stores)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def builtin_recipe_path(name: str) -> Path:
    """Path of a recipe shipped with medmodal (``medmodal/recipes/<name>.yaml``)."""
    path = Path(__file__).resolve().parent.parent / "recipes" / f"{name}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise RecipeError(f"no built-in recipe {name!r}; available: {', '.join(available)}")
    return path
