"""The ``method:`` section of an M2DN recipe (``shared/methods/m2dn.md`` §2.5: every choice the paper leaves open,
with medmodal's default)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from medmodal.engine.plugin import MethodSection

#: The paper's ablation variants (spec §2.5) → ``(loss_channels, model.kwargs.mask_cond)``.
VARIANTS: dict[str, tuple[str, str]] = {
    "U": ("missing", "none"),
    "U+J": ("all", "none"),
    "U+M": ("missing", "bottleneck_concat"),
    "U+J+M": ("all", "bottleneck_concat"),
}


class M2DNMethod(MethodSection):
    """M2DN (IEEE TMI 2024): one modality-masked diffusion model fills any subset of missing modalities.

    ``mode: regression`` trains the same network as a direct regression baseline (missing channels zero-filled,
    the mask as an input, one forward pass; no diffusion), with the same data and budget.
    """

    name: Literal["m2dn"] = "m2dn"
    mode: Literal["diffusion", "regression"] = "diffusion"
    # diffusion schedule and objective (spec §2.2, §2.5)
    timesteps: int = Field(1000, ge=2)
    beta_schedule: Literal["linear", "cosine"] = "linear"
    beta_start: float = Field(1e-4, gt=0.0, lt=1.0)
    beta_end: float = Field(2e-2, gt=0.0, lt=1.0)
    objective: Literal["pred_x0", "pred_eps"] = "pred_x0"
    # all: self-reconstruction of the available channels + synthesis of the missing ones ("J"); missing: the latter
    loss_channels: Literal["all", "missing"] = "all"
    # uniform over the 2^M - 2 partial patterns (spec), one fixed scenario (the paper's "J" and cDM variants), or
    # MM-GAN's easy-to-hard curriculum: at most k contrasts hidden, k rising from 1 to M - 1 in equal stages over
    # the first curriculum_fraction of the steps, then uniform
    mask_dist: Literal["uniform", "fixed", "curriculum"] = "uniform"
    curriculum_fraction: float = Field(0.5, gt=0.0, le=1.0)
    fixed_available: list[str] | None = None  # mask_dist fixed: the modalities given as input
    # the paper's ablation names; when set they fix loss_channels and model.kwargs.mask_cond (VARIANTS)
    variant: Literal["U", "U+J", "U+M", "U+J+M"] | None = None
    # a training case lacking a modality: error (the paper trains on complete cases) or, beyond the paper, that
    # channel is always marked missing and left out of the loss
    incomplete_cases: Literal["error", "mask"] = "error"
    # sampling (spec §2.4, §2.5): the run's default for evaluate and synthesize
    sampler: Literal["ddpm", "ddim"] = "ddpm"
    sample_steps: int | None = Field(None, ge=1)  # None: every one of the timesteps
    eta: float = Field(0.0, ge=0.0, le=1.0)  # DDIM only (0: deterministic; 1: DDPM-like noise)
    clip_x0: bool = True  # clip each predicted clean image to the data range [-1, 1]
    ema_decay: float = Field(0.999, ge=0.0, lt=1.0)  # EMA of the weights used for sampling (0: none)
    sample_seed: int = 0
    # validation during training: DDIM with few steps on every partial pattern of each validation case
    val_steps: int = Field(10, ge=1)
    # intensity mapping (spec §2.5): percentiles over the foreground -> [0, 1] -> [-1, 1]
    percentiles: tuple[float, float] = (0.5, 99.5)

    @field_validator("percentiles")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 <= v[0] < v[1] <= 100.0:
            raise ValueError(f"must be [low, high] with 0 <= low < high <= 100, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> M2DNMethod:
        if self.beta_start >= self.beta_end:
            raise ValueError(f"beta_start ({self.beta_start}) must be below beta_end ({self.beta_end})")
        if self.sample_steps is not None and self.sample_steps > self.timesteps:
            raise ValueError(f"sample_steps ({self.sample_steps}) cannot exceed timesteps ({self.timesteps})")
        if self.mask_dist == "fixed" and not self.fixed_available:
            raise ValueError("mask_dist: fixed needs fixed_available, the modalities given as input, e.g. [t1, t2]")
        if self.mask_dist != "fixed" and self.fixed_available:
            raise ValueError("fixed_available is only used with mask_dist: fixed")
        if self.variant is not None:
            loss, _ = VARIANTS[self.variant]
            if "loss_channels" in self.model_fields_set and self.loss_channels != loss:
                raise ValueError(f"variant {self.variant} trains with loss_channels {loss}; remove loss_channels "
                                 f"({self.loss_channels}) or the variant")
            self.loss_channels = loss  # type: ignore[assignment]
        if self.objective == "pred_eps" and self.loss_channels != "missing":
            raise ValueError("objective pred_eps predicts the noise of the missing channels only (the available ones "
                             "carry none): set loss_channels: missing")
        if self.sampler == "ddpm" and self.eta != 0.0:
            raise ValueError("eta is a DDIM setting; with sampler ddpm leave it at 0")
        if self.mode == "regression" and self.objective != "pred_x0":
            raise ValueError("mode regression predicts images: objective must be pred_x0")
        return self
