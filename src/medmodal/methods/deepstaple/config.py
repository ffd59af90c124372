"""The ``method:`` section of a DeepSTAPLE recipe, with its candidate labels (``method.candidates``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from medmodal.engine.plugin import MethodSection


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


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


#: ``method.lr_decay`` values; ``faithful`` is read as ``every_kth_epoch_per_batch`` (recipes written before the
#: spec's names were adopted).
LR_DECAYS = ("every_kth_epoch_per_batch", "per_epoch", "per_batch", "schedule")


class DeepStapleMethod(MethodSection):
    """DeepSTAPLE (Weihsbach et al., WBIR 2022): one learnable data parameter per registered label.

    Defaults follow ``shared/methods/deepstaple.md`` (§2.3, §2.6, §2.7) and the official code; every departure
    from it is a switch here and in ``docs/deepstaple.md``:

    * ``ce_normalisation``: the model step's class-weighted cross-entropy is divided by the sum of the voxels'
      class weights (``"weight_sum"``, ``nn.CrossEntropyLoss(weight=w)`` as in the official code) or by the
      number of voxels (``"voxel_mean"``, whose scale moves with each batch's foreground share).
    * ``lr_decay``: ``"every_kth_epoch_per_batch"`` (official code: ``ExponentialLR(lr_gamma)`` stepped every
      batch, but only in epochs that are multiples of ``lr_decay_every``), ``"per_epoch"`` (``lr_gamma`` once per
      epoch), ``"per_batch"`` (every batch) or ``"schedule"`` (``train.schedule`` over ``train.max_steps``,
      e.g. ``constant``).
    * ``drop_last``: leave out each epoch's last, partial batch, so every θ step comes from a full batch (a batch
      of one sample gives its θ no gradient: ``σ(θ)/mean σ(θ) = 1`` whatever θ is).
    * ``staple_backend``: the STAPLE that DeepSTAPLE's reports compare with: medmodal's float64 implementation
      (``"torch64"``) or SimpleITK's ``STAPLEImageFilter`` (``"simpleitk"``).
    """

    name: Literal["deepstaple"] = "deepstaple"
    dp_update: Literal["ool", "inline"] = "ool"
    risk_regularization: bool = True
    fixed_weighting: Literal["log_fg", "off"] = "log_fg"
    dp_loss_class_weights: bool = False
    dp_lr: float = Field(0.1, gt=0)
    class_weight_exponent: float = Field(0.35, ge=0)
    ce_normalisation: Literal["weight_sum", "voxel_mean"] = "weight_sum"
    lr_decay: Literal["every_kth_epoch_per_batch", "per_epoch", "per_batch", "schedule"] = (
        "every_kth_epoch_per_batch")
    lr_gamma: float = Field(0.99, gt=0, le=1)
    lr_decay_every: int = Field(10, ge=1)
    drop_last: bool = True
    staple_backend: Literal["torch64", "simpleitk"] = "torch64"
    candidates: CandidateLabelsConfig | None = None

    @field_validator("lr_decay", mode="before")
    @classmethod
    def _old_name(cls, v: object) -> object:
        return "every_kth_epoch_per_batch" if v == "faithful" else v
