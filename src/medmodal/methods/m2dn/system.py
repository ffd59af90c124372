"""The M2DN training system: modality-masked diffusion (or its direct-regression baseline) around a pure
denoiser.

Paper: *Multi-Modal Modality-Masked Diffusion Network for Brain MRI Synthesis With Random Modality Missing*,
IEEE TMI 2024 (spec ``shared/methods/m2dn.md``). Each training step draws, per sample, a partial missing pattern
(uniform over the 2^M − 2 patterns, §2.2), a timestep and noise, diffuses only the missing channels, and
regresses the clean image of every channel (x̂0 objective). The sampling weights are an exponential moving
average of the trained ones (:attr:`network`, saved to ``weights/``); the trained copy is :attr:`online`.

Validation fills every partial pattern of each validation case with a few DDIM steps (seeded per case, so any
number of ranks gives the same values) and logs PSNR, SSIM and MAE of the synthesised channels inside the
foreground on the [0, 1] scale (:mod:`medmodal.evaluation.synthesis`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from medmodal.data.case import Batch, DataError
from medmodal.engine.system import MethodSystem, lr_factor, make_optimizer, stepped_schedule
from medmodal.methods.m2dn.diffusion import MaskedDiffusion, ema_update
from medmodal.methods.m2dn.inference import (
    Mode,
    SamplerSettings,
    case_generator,
    case_patterns,
    fill_case,
    regression_input,
)


class M2DNSystem(MethodSystem):
    """Train an M2DN denoiser (or the regression baseline) on complete (or masked incomplete) cases.

    Args:
        network: ``forward(x_t (B, M, *S), available (B, M) bool, timestep (B,)) -> x̂0 (B, M, *S)``.
        diffusion: the schedule, mask sampler, loss and samplers (:class:`MaskedDiffusion`).
        mode: ``"diffusion"`` or ``"regression"`` (missing channels zero-filled, one pass, no noise).
        loss_channels: ``"all"`` (self-reconstruction + synthesis) or ``"missing"``.
        fixed_available: ``(M,)`` bool: always this scenario (``mask_dist: fixed``), or ``None``.
        curriculum: draw patterns easy to hard (``mask_dist: curriculum``, :meth:`curriculum_limit`) over the first
            ``curriculum_fraction`` of the steps; otherwise uniform (unless ``fixed_available``).
        incomplete_cases: ``"error"`` or ``"mask"`` (a truly absent channel is missing and out of the loss).
        ema_decay: decay of the sampling weights' moving average (0: a copy of the trained weights).
        val_steps: DDIM steps of the validation synthesis.
        clip_x0: clip predicted clean images to [−1, 1].
        optimizer, lr, weight_decay, momentum, schedule, max_steps, warmup_steps: optimisation.
        seed: seeds the per-rank generator (masks, timesteps, noise) and the validation noise.
        model_dims: the denoiser's dimension; 2 with 3D data means one-slice patches ``(B, M, H, W, 1)`` are
            trained as 2D images and validation goes slice by slice.
    """

    def __init__(
        self,
        *,
        network: nn.Module,
        diffusion: MaskedDiffusion,
        modalities: Sequence[str],
        mode: Mode = "diffusion",
        loss_channels: Literal["all", "missing"] = "all",
        fixed_available: Sequence[bool] | None = None,
        curriculum: bool = False,
        curriculum_fraction: float = 0.5,
        incomplete_cases: Literal["error", "mask"] = "error",
        ema_decay: float = 0.999,
        val_steps: int = 10,
        clip_x0: bool = True,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        momentum: float = 0.99,
        schedule: Literal["poly", "cosine", "constant"] = "constant",
        max_steps: int = 1000,
        warmup_steps: int = 0,
        seed: int = 0,
        model_dims: int | None = None,
    ) -> None:
        super().__init__(seed=seed)
        self.model_dims = model_dims
        self.online = network
        self.network = copy.deepcopy(network).requires_grad_(False)
        self.diffusion = diffusion
        self.modalities = tuple(modalities)
        self.mode, self.loss_channels = mode, loss_channels
        self.fixed_available = None if fixed_available is None else torch.tensor(list(fixed_available))
        self.incomplete_cases = incomplete_cases
        self.curriculum, self.curriculum_fraction = bool(curriculum), float(curriculum_fraction)
        self.ema_decay, self.val_steps, self.clip_x0 = float(ema_decay), int(val_steps), bool(clip_x0)
        self.optimizer_name, self.lr, self.weight_decay, self.momentum = optimizer, lr, weight_decay, momentum
        self.schedule, self.max_steps, self.warmup_steps = schedule, max_steps, warmup_steps

    progress_metrics = ("psnr",)

    def val_metric_names(self) -> Sequence[str]:
        return ["psnr", "ssim", "mae"]

    # -- training -------------------------------------------------------------------------------------------
    def _missing(self, present: torch.Tensor) -> torch.Tensor:
        """``(B, M)`` bool simulated-missing pattern of each sample (truly absent channels always missing)."""
        if not bool(present.all()) and self.incomplete_cases == "error":
            raise DataError("a training case lacks a modality; M2DN trains on complete cases (set "
                            "method.incomplete_cases: mask to train on incomplete ones, beyond the paper)")
        if self.fixed_available is not None:
            missing = (~self.fixed_available.to(present.device))[None].expand_as(present)
            if bool((present & ~missing).sum(1).eq(0).any()):
                raise DataError("method.fixed_available: a training case lacks every input modality of the "
                                "fixed scenario")
            return missing | ~present
        limit = self.curriculum_limit(int(self.global_step), present.shape[1]) if self.curriculum else None
        return self.diffusion.sample_missing(present.cpu(), generator=self.generator,
                                             max_missing=limit).to(present.device)

    def curriculum_limit(self, step: int, m: int) -> int | None:
        """The most contrasts a training pattern may hide at optimiser ``step`` under the easy-to-hard curriculum
        (``mask_dist: curriculum``): 1 at the start, one more in each of ``M − 1`` equal stages of the first
        ``curriculum_fraction`` of ``max_steps``, then no limit."""
        span = self.curriculum_fraction * max(1, self.max_steps)
        if step >= span:
            return None
        return min(m - 1, 1 + int((m - 1) * step / span))

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        x0, present = batch.image, batch.available
        if self.model_dims is not None and x0.ndim - 2 == self.model_dims + 1:
            if x0.shape[-1] != 1:
                raise ValueError(f"a {self.model_dims}D denoiser trains on one-slice patches, got {tuple(x0.shape)}")
            x0 = x0[..., 0]
        missing = self._missing(present)
        b = x0.shape[0]
        if self.mode == "regression":
            t = torch.zeros(b, dtype=torch.long, device=x0.device)
            noise = None
            pred = self.online(regression_input(x0, ~missing), ~missing, t)
        else:
            t = self.diffusion.sample_timesteps(b, generator=self.generator).to(x0.device)
            noise = torch.randn(x0.shape, generator=self.generator).to(x0.device)
            x_t = self.diffusion.q_sample(x0, ~missing, t, noise)
            pred = self.online(x_t, ~missing, t)
        loss = self.diffusion.loss(pred, x0, missing=missing, present=present, loss_channels=self.loss_channels,
                                   noise=noise)
        self.log("train/loss", loss, prog_bar=True, batch_size=b, sync_dist=True)
        self.log("train/n_missing", missing.float().sum(1).mean(), batch_size=b)
        if self._trainer is not None and self.trainer.optimizers:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=1)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        ema_update(self.network, self.online, decay=self.ema_decay)

    # -- validation -----------------------------------------------------------------------------------------
    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        from medmodal.evaluation.synthesis import synthesis_metrics
        from medmodal.methods.m2dn.data import to_unit

        weight = batch.weight if batch.weight is not None else torch.ones(len(batch))
        dims = batch.image.ndim - 2
        settings = SamplerSettings(sampler="ddim", steps=min(self.val_steps, self.diffusion.timesteps), eta=0.0,
                                   clip=self.clip_x0)
        for i in range(len(batch)):
            present = batch.available[i]
            pats = case_patterns(present.tolist())
            if not pats:
                continue
            gen = case_generator(self.seed, batch.case_id[i], batch.image.device)
            filled = fill_case(self.network, batch.image[i], torch.tensor(pats, device=batch.image.device),
                               model_dims=self.model_dims or dims, mode=self.mode, diffusion=self.diffusion,
                               settings=settings, batch_size=64, generator=gen)
            truth = to_unit(batch.image[i]).cpu().numpy()
            mask = (batch.image[i][present] > -1.0).any(0).cpu().numpy()
            if not mask.any():
                continue
            pred = to_unit(filled).cpu().numpy()
            values: dict[str, list[float]] = {"psnr": [], "ssim": [], "mae": []}
            for k, pat in enumerate(pats):
                for m in np.flatnonzero(np.asarray(present.tolist()) & ~np.asarray(pat)):
                    res = synthesis_metrics(pred[k, m], truth[m], mask, spatial_dims=dims)
                    for name in values:
                        values[name].append(float(res[name]))
            for name, vals in values.items():
                finite = [v for v in vals if np.isfinite(v)]
                if finite:
                    self.add_val_metric(name, float(np.mean(finite)), weight[i])

    # -- optimisation ---------------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        opt = make_optimizer(self.online.parameters(), name=self.optimizer_name, lr=self.lr,
                             weight_decay=self.weight_decay, momentum=self.momentum)

        return stepped_schedule(opt, lambda step: lr_factor(step, schedule=self.schedule, total=max(1, self.max_steps)),
                                warmup_steps=self.warmup_steps)
