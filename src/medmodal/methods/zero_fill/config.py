"""The ``method:`` section of a zero-fill recipe."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from medmodal.engine.plugin import MethodSection


class ZeroFillMethod(MethodSection):
    """The zero-fill baseline: missing modalities are zero channels; random modality dropout in training."""

    name: Literal["zero_fill"] = "zero_fill"
    modality_dropout: float = Field(0.5, ge=0.0, le=1.0)
    lambda_dice: float = 1.0
    lambda_bce: float = 1.0
