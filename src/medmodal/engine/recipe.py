"""Recipes: the YAML schema of a run, validated by pydantic.

Every section forbids unknown keys, so a typo (``max_step``) is an error that names the field instead of a
silently ignored setting. ``load_recipe`` turns validation errors into :class:`RecipeError` messages like
``recipe.yaml: train.max_step: unknown field``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)

from medmodal.engine.plugin import MethodSection, default_method, get_method, method_names


class RecipeError(ValueError):
    """An invalid recipe; the message names the file and the field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class PhantomConfig(_Section):
    """The embedded synthetic phantom used when ``data.path`` is not set.

    ``kind``: ``brain`` (:mod:`medmodal.data.phantom`, multi-modal brain tumour, 2D or 3D) or ``chest_xray``
    (:mod:`medmodal.data.phantom_xray`: 2D chest X-rays with lung masks, classes normal/opacity and ``sources``
    sources that differ in contrast, gamma, bias, noise and resolution; ``size`` is source A's pixels per side).
    """

    kind: Literal["brain", "chest_xray"] = "brain"
    cases: int = Field(40, ge=2)
    spatial_dims: Literal[2, 3] = 3
    size: int | list[int] = 64
    spacing: list[float] | None = None
    seed: int = 0
    missing_rate: float = Field(0.0, ge=0.0, lt=1.0)
    sources: int = Field(3, ge=2)  # chest_xray only

    @field_validator("spacing")
    @classmethod
    def _positive_spacing(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (not v or any(not s > 0 for s in v)):
            raise ValueError(f"spacing must be positive voxel sizes in mm, e.g. [1, 1, 3], got {v}")
        return v

    @model_validator(mode="after")
    def _fits_kind(self) -> PhantomConfig:
        if self.kind == "brain":
            if self.sources != 3:
                raise ValueError("sources: only the chest_xray phantom has sources; remove data.phantom.sources "
                                 "or set data.phantom.kind: chest_xray")
            return self
        from medmodal.data.phantom_xray import CHEST_SOURCES

        if self.spatial_dims != 2:
            raise ValueError("spatial_dims: the chest_xray phantom is 2D; set data.phantom.spatial_dims: 2")
        if self.missing_rate != 0:
            raise ValueError("missing_rate: the chest_xray phantom has one modality (xray), so none can be missing; "
                             "set data.phantom.missing_rate: 0")
        if self.spacing is not None:
            raise ValueError("spacing: each chest_xray source has its own pixel spacing; remove "
                             "data.phantom.spacing")
        if not isinstance(self.size, int) or self.size < 16:
            raise ValueError(f"size: the chest_xray phantom takes one size, source A's pixels per side (at least "
                             f"16), got {self.size}")
        if self.sources > len(CHEST_SOURCES):
            raise ValueError(f"sources: the chest_xray phantom has {len(CHEST_SOURCES)} sources "
                             f"({', '.join(CHEST_SOURCES)}), got {self.sources}")
        return self


def _increasing(v: tuple[float, float]) -> tuple[float, float]:
    if v[0] > v[1]:
        raise ValueError(f"must be [low, high] with low <= high, got {list(v)}")
    return v


_Range = Annotated[tuple[float, float], AfterValidator(_increasing)]


class HistogramClipConfig(_Section):
    """``data.histogram_clip``: clip each modality at the top of its histogram before the z-score (ShaSpec).

    ``histogram_clip: {}`` turns it on with these defaults; see :class:`medmodal.data.preprocess.HistogramClip`.
    """

    min_count: int = Field(50, ge=1)  # a bin counts when it holds at least this many non-zero voxels
    bins: int = Field(1000, ge=1)  # equal-width bins over the non-zero intensity range


class _AugmentStep(_Section):
    prob: float | None = Field(None, ge=0.0, le=1.0)  # None: the preset's probability


class RescaleAugment(_AugmentStep):
    range: _Range = (0.9, 1.1)


class AffineAugment(_AugmentStep):
    rotate_degrees: float = Field(15.0, ge=0.0, le=180.0)
    scale: _Range = (0.85, 1.25)


class ElasticAugment(_AugmentStep):
    sigma: _Range = (9.0, 13.0)
    magnitude: _Range = (0.0, 900.0)


class FlipAugment(_AugmentStep):
    pass


class NoiseAugment(_AugmentStep):
    std: float = Field(0.1, ge=0.0)


class BlurAugment(_AugmentStep):
    sigma: _Range = (0.5, 1.0)


class BrightnessAugment(_AugmentStep):
    range: _Range = (0.75, 1.25)


class ContrastAugment(_AugmentStep):
    range: _Range = (0.75, 1.25)


class LowResolutionAugment(_AugmentStep):
    zoom: _Range = (0.5, 1.0)


class GammaAugment(_AugmentStep):
    range: _Range = (0.7, 1.5)


#: probability of each transform per preset. ``nnunet_like``: the batchgenerators pipeline of ShaSpec's released code
#: except elastic deformation, off because it costs 0.5-1.3 s per 3D patch here (benchmarks/augmentation.py).
AUGMENTATION_PRESETS: dict[str, dict[str, float]] = {
    "nnunet_like": {"rescale": 0.5, "affine": 0.2, "elastic": 0.0, "flip": 0.5, "noise": 0.1, "blur": 0.2,
                    "brightness": 0.15, "contrast": 0.15, "low_resolution": 0.25, "gamma": 0.15},
    "none": {"rescale": 0.0, "affine": 0.0, "elastic": 0.0, "flip": 0.0, "noise": 0.0, "blur": 0.0,
             "brightness": 0.0, "contrast": 0.0, "low_resolution": 0.0, "gamma": 0.0},
}


class AugmentationConfig(_Section):
    """``data.augmentation``: random augmentation of training patches
    (:class:`medmodal.transforms.augment.PatchAugmentation`).

    Off unless ``enabled``. Each transform has a ``prob`` (per patch; ``flip``: per axis) and its ranges; a
    ``prob`` left out takes the ``preset``'s value, and the resolved recipe records every value used.
    """

    enabled: bool = False
    preset: Literal["nnunet_like", "none"] = "nnunet_like"
    rescale: RescaleAugment = RescaleAugment()
    affine: AffineAugment = AffineAugment()
    elastic: ElasticAugment = ElasticAugment()
    flip: FlipAugment = FlipAugment()
    noise: NoiseAugment = NoiseAugment()
    blur: BlurAugment = BlurAugment()
    brightness: BrightnessAugment = BrightnessAugment()
    contrast: ContrastAugment = ContrastAugment()
    low_resolution: LowResolutionAugment = LowResolutionAugment()
    gamma: GammaAugment = GammaAugment()

    @model_validator(mode="after")
    def _preset_probabilities(self) -> AugmentationConfig:
        for name, p in AUGMENTATION_PRESETS[self.preset].items():
            step = getattr(self, name)
            if step.prob is None:
                step.prob = p
        return self

    def transform_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :class:`~medmodal.transforms.augment.PatchAugmentation` (less
        ``spatial_dims`` and ``patch_size``); every probability is 0 when not ``enabled``."""
        on = 1.0 if self.enabled else 0.0
        return {
            **{f"{name}_prob": on * float(getattr(self, name).prob) for name in AUGMENTATION_PRESETS[self.preset]},
            "rescale_range": self.rescale.range, "rotate_degrees": self.affine.rotate_degrees,
            "scale_range": self.affine.scale, "elastic_sigma": self.elastic.sigma,
            "elastic_magnitude": self.elastic.magnitude, "noise_std": self.noise.std, "blur_sigma": self.blur.sigma,
            "brightness_range": self.brightness.range, "contrast_range": self.contrast.range,
            "low_resolution_zoom": self.low_resolution.zoom, "gamma_range": self.gamma.range,
        }


class DataConfig(_Section):
    path: Path | None = None
    format: Literal["auto", "brats", "nnunet", "manifest"] = "auto"
    phantom: PhantomConfig = PhantomConfig()
    modalities: list[str] | None = None
    target_spacing: list[float] | None = None
    cache_dir: Path | None = None
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    # share of the training split's labelled cases that train (label-efficiency studies): a seeded draw, nested
    # across fractions (the 10 % cases are among the 25 %); validation keeps all its cases
    label_fraction: float = Field(1.0, gt=0.0, le=1.0)
    patch_size: list[int] = [48, 48, 48]
    batch_size: int = Field(2, ge=1)
    foreground_fraction: float = Field(1 / 3, ge=0.0, le=1.0)
    num_workers: int = Field(1, ge=0)
    histogram_clip: HistogramClipConfig | None = None  # None: plain z-score
    augmentation: AugmentationConfig = AugmentationConfig()

    @model_validator(mode="before")
    @classmethod
    def _moved_fields(cls, data: Any) -> Any:
        if isinstance(data, dict) and "candidates" in data:
            raise ValueError("data.candidates moved to the method section: write it as method.candidates")
        return data

    @field_validator("modalities")
    @classmethod
    def _modality_names(cls, v: list[str] | None) -> list[str] | None:
        from medmodal.data.formats.brats import canonical_modality  # the one normalisation of modality names

        return None if v is None else [canonical_modality(str(m)) for m in v]

    @field_validator("patch_size")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if not v or any(s < 1 for s in v):
            raise ValueError(f"patch_size must be positive sizes, got {v}")
        return v


class ModelConfig(_Section):
    name: str = "unet"
    kwargs: dict[str, Any] = {"channels": [16, 32, 64, 128]}


class TrainConfig(_Section):
    max_steps: int = Field(600, ge=1)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)  # none unless a recipe asks for it (as torch.optim.SGD)
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
    gradient_clip_norm: float | None = Field(None, gt=0)  # clip the global gradient norm (None: no clipping)
    # start from another run's weights (fine-tuning a pretrained run; `medmodal train --from RUN`): every parameter
    # whose name and shape match is copied before the first step; the run's method may map names
    # (MethodPlugin.initial_weights); run.json records what was loaded and what was not
    init_from: Path | None = None


class EvalConfig(_Section):
    """Sliding-window evaluation and prediction. Defaults: window = training crop, overlap 1/3, plain mean of the
    windows' probabilities, threshold 0.5 (a method's docs say where this rule comes from)."""

    roi_size: list[int] | None = None  # sliding-window size for evaluation/prediction; None = data.patch_size
    overlap: float = Field(1 / 3, ge=0.0, lt=1.0)
    # mean_prob: mean of the windows' sigmoid (regions) / softmax (labels) probabilities, threshold 0.5 / argmax;
    # gaussian_logits: Gaussian-weighted mean of the windows' logits (nnU-Net), threshold 0 / argmax
    blend: Literal["mean_prob", "gaussian_logits"] = "mean_prob"
    # windows per network call (each run under every evaluated subset); auto: the fewest equal batches within
    # medmodal.evaluation.inference.MAX_BATCH_VOXELS (batch 1 is ~5x slower per sample on a CPU, all at once too)
    sw_batch_size: int | Literal["auto"] = "auto"
    max_cases: int | None = None
    # ShaSpec* post-processing: a predicted ET smaller than this many voxels becomes necrosis (released code: 500)
    et_min_voxels: int | None = Field(None, ge=1)

    @field_validator("sw_batch_size", mode="before")
    @classmethod
    def _window_batch(cls, v: Any) -> Any:
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            return v
        if isinstance(v, str) and v.strip().isdigit() and int(v) >= 1:  # from --set eval.sw_batch_size=4
            return int(v)
        raise ValueError(f"a positive number of windows or 'auto', got {v!r}")


class Recipe(_Section):
    """A whole run: data, model, method, training and evaluation settings.

    ``method`` is the section of a registered method plug-in (:mod:`medmodal.engine.plugin`), chosen by its
    ``name``; a recipe without one uses the default method. Checks that involve the method and another section
    are the plug-in's :meth:`~medmodal.engine.plugin.MethodPlugin.check_recipe`.
    """

    name: str = "run"
    seed: int = 0
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    method: SerializeAsAny[MethodSection] = Field(default_factory=lambda: default_method().config())
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()

    @field_validator("method", mode="before")
    @classmethod
    def _method_section(cls, v: Any) -> Any:
        if isinstance(v, MethodSection):
            return v
        if not isinstance(v, dict) or "name" not in v:
            raise ValueError(f"method needs a name: one of {', '.join(method_names())}")
        try:
            return get_method(str(v["name"])).config.model_validate(v)
        except KeyError as err:
            raise ValueError(err.args[0]) from None

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        dims = self.spatial_dims
        if len(self.data.patch_size) != dims:
            raise ValueError(f"data.patch_size has {len(self.data.patch_size)} sizes but the data is {dims}D")
        if self.eval.roi_size is not None and len(self.eval.roi_size) != dims:
            raise ValueError(f"eval.roi_size has {len(self.eval.roi_size)} sizes but the data is {dims}D")
        plugin = get_method(self.method.name)
        if self.data.label_fraction < 1.0 and not plugin.honours_label_fraction:
            raise ValueError(f"data.label_fraction: method {self.method.name!r} does not subsample its training "
                             "labels this way (see its method section for its own label budget); remove the field")
        plugin.check_recipe(self)
        return self

    @property
    def eval_roi_size(self) -> list[int]:
        """Sliding-window size at evaluation and prediction time."""
        return self.eval.roi_size or self.data.patch_size

    @property
    def spatial_dims(self) -> int:
        """2 or 3: the phantom's, or the length of ``patch_size`` for data on disk."""
        return self.data.phantom.spatial_dims if self.data.path is None else len(self.data.patch_size)

    @property
    def world_size(self) -> int:
        """Processes that train the recipe (``devices × num_nodes``)."""
        return self.train.devices * self.train.num_nodes


def _format_validation(err: ValidationError, where: str) -> str:
    lines = []
    for e in err.errors():
        # a method section's errors are reported under `method.<field>` (drop pydantic's function-before tag)
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-")) or "<recipe>"
        msg = "unknown field (check the spelling)" if e["type"] == "extra_forbidden" else e["msg"]
        msg = msg.removeprefix("Value error, ")
        lines.append(f"{where}: {loc}: {msg}")
    return "\n".join(lines)


def recipe_from_dict(data: dict[str, Any], *, where: str = "<recipe>") -> Recipe:
    """Validate a nested dict as a :class:`Recipe` (errors name the field)."""
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(_format_validation(err, where)) from None


def _recipe_mapping(path: Path) -> dict[str, Any]:
    """The YAML mapping of a recipe file, unvalidated (a missing file, bad YAML or a non-mapping is an error)."""
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections (data, model, train, ...)")
    return data


def load_recipe(path: Path | str, *, overrides: dict[str, Any] | None = None) -> Recipe:
    """Read a YAML recipe, apply dotted ``overrides`` (``{"train.max_steps": 10}``) and validate it."""
    path = Path(path)
    return recipe_from_dict(apply_overrides(_recipe_mapping(path), overrides or {}), where=str(path))


def parse_overrides(sets: list[str]) -> dict[str, Any]:
    """Command-line ``--set key=value`` strings → dotted overrides; values are YAML (``[32, 32]``, ``0.1``)."""
    out = {}
    for s in sets:
        if "=" not in s:
            raise RecipeError(f"--set {s!r}: expected key=value, e.g. train.max_steps=100")
        key, value = s.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise RecipeError(f"--set {s!r}: the value is not valid YAML ({err.problem})") from None
    return out


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


def resolve_paths(recipe: Recipe, *, base: Path | None = None) -> Recipe:
    """A copy of ``recipe`` whose relative paths (in every section, the method's too) are absolute.

    Relative paths are taken from ``base`` (default: the working folder), as when the recipe was given; a run
    folder stores the resolved recipe so that it works from any folder.
    """
    root = Path.cwd() if base is None else Path(base)

    def walk(model: BaseModel) -> None:
        for name in type(model).model_fields:
            value = getattr(model, name)
            if isinstance(value, Path) and not value.is_absolute():
                object.__setattr__(model, name, (root / value).resolve())
            elif isinstance(value, BaseModel):
                walk(value)

    out = recipe.model_copy(deep=True)
    walk(out)
    return out


def dump_recipe(recipe: Recipe) -> str:
    """The recipe as YAML with every default resolved (what a run folder stores)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def read_recipe_method(path: Path | str) -> str:
    """The ``method.name`` of a recipe file (the default method when it has no method section), without
    validating the rest."""
    method = _recipe_mapping(Path(path)).get("method")
    if isinstance(method, dict) and method.get("name"):
        return str(method["name"])
    from medmodal.engine.plugin import default_method

    return default_method().name


def builtin_recipe_path(name: str) -> Path:
    """Path of a recipe shipped with medmodal (``medmodal/recipes/<name>.yaml``)."""
    path = Path(__file__).resolve().parent.parent / "recipes" / f"{name}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise RecipeError(f"no built-in recipe {name!r}; available: {', '.join(available)}")
    return path
