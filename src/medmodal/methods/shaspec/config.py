"""The ``method:`` section of a ShaSpec recipe."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from medmodal.engine.plugin import MethodSection
from medmodal.methods.zero_fill.config import RegionLossFields


class ShaSpecPhase(BaseModel):
    """One training phase: ``steps`` optimiser steps seeing all modalities (``full``) or random subsets."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(ge=1)
    sampler: Literal["full", "random"] = "random"


class ShaSpecMethod(RegionLossFields, MethodSection):
    """ShaSpec (Wang et al., CVPR 2023): shared + specific encoders, DAO and DCO auxiliary losses.

    Defaults follow the paper where it is explicit (``../shared/methods/shaspec.md`` §2.5); the released
    code's behaviour is one switch away. The region-loss fields (``lambda_dice``, ``lambda_bce``,
    ``bce_reduction``, ``dice_reduction``, ``dice_smooth_nr``, ``dice_smooth_dr``) are the zero-fill baseline's
    (:class:`~medmodal.methods.zero_fill.config.RegionLossFields`), with the released code's loss as default.
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

    @field_validator("dedicated")
    @classmethod
    def _non_empty(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and not v:
            raise ValueError("dedicated must name at least one modality (or be left out)")
        return v
