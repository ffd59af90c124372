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


class DeepStapleMethod(MethodSection):
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
    candidates: CandidateLabelsConfig | None = None
