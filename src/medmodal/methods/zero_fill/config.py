"""The ``method:`` section of a zero-fill recipe, and the region-loss fields it shares with ShaSpec's."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from medmodal.engine.plugin import MethodSection


class RegionLossFields(BaseModel):
    """The settings of :class:`medmodal.losses.segmentation.RegionDiceBCELoss` in a method section.

    Shared by the zero-fill baseline and ShaSpec so that a comparison of the two trains both with one loss
    rule. The defaults are ShaSpec's released loss (``shared/methods/shaspec.md`` §2.3): BCE summed over the
    region channels, Dice per sample with smoothing 0 (numerator) and 1 (denominator).
    """

    lambda_dice: float = 1.0
    lambda_bce: float = 1.0
    bce_reduction: Literal["sum", "mean"] = "sum"  # over the region channels
    dice_reduction: Literal["sample", "batch"] = "sample"  # a Dice per sample, or one over the whole batch
    dice_smooth_nr: float = Field(0.0, ge=0.0)
    dice_smooth_dr: float = Field(1.0, ge=0.0)

    def loss_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``RegionDiceBCELoss`` (and of the systems that build it)."""
        return {name: getattr(self, name) for name in RegionLossFields.model_fields}


class ZeroFillMethod(RegionLossFields, MethodSection):
    """The zero-fill baseline: missing modalities are zero channels; random modality dropout in training."""

    name: Literal["zero_fill"] = "zero_fill"
    modality_dropout: float = Field(0.5, ge=0.0, le=1.0)
    # segmentation (the region loss) or classification (cross-entropy on each case's `target`; the network returns
    # (B, num_classes) logits, e.g. `pumit_vit_cls` fine-tuned from a pretrained ViT)
    task: Literal["segmentation", "classification"] = "segmentation"
