"""DeepSTAPLE: a segmentation network trained on noisy candidate labels, with one data parameter per label.

Weihsbach, Bigalke, Kruse, Hempe, Heinrich, *DeepSTAPLE: Learning to Predict Multimodal Registration Quality for
Unsupervised Domain Adaptation*, WBIR 2022; data parameters after Saxena, Tuzel, DeCoste, NeurIPS 2019. Every
training sample is a (target image, candidate label ``j``) pair; ``θ_j`` (``nn.Embedding(N, 1, sparse=True)``,
initialised to 0, stepped by ``SparseAdam``) learns how well label ``j`` can be fitted, i.e. its quality.

Per batch, the **out-of-line** (``"ool"``) update of the paper (manual optimisation):

1. *model step*: class-weighted cross-entropy of the network's logits (normalised by the sum of the voxels'
   class weights, as ``nn.CrossEntropyLoss(weight=w)`` in the official code, or by the voxel count), one network
   optimiser step; θ is not involved;
2. *DP step*: a second forward of the frozen network (train mode as in the paper, so batch-norm running
   statistics, if any, see it too; no graph, so the parameters stay bit-identical), then
   ``L_dp = Σ_b w_b ℓ_b + R`` (:func:`~medmodal.losses.data_parameters.data_parameter_loss`) and one SparseAdam
   step on the batch's θ rows only.

``"inline"`` is the classic data-parameter update: one forward, ``L_dp`` steps the network and θ together.

The θ optimiser is stepped outside Lightning's optimiser wrapper, so ``global_step`` counts network steps (one
per batch), and its loss never passes through an AMP gradient scaler (its graph holds only θ). Both optimisers
and the schedule are returned by ``configure_optimizers``, so they are in every checkpoint and a run resumes.
In multi-process training the network is synchronised by DDP and θ by computing its update from the gathered
global batch on every rank (θ is excluded from DDP), so N ranks train as one process with the same global batch.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

from medmodal.engine.system import MethodSystem, lr_factor, make_optimizer
from medmodal.evaluation.inference import predict_subsets
from medmodal.evaluation.metrics import binary_dice
from medmodal.losses.data_parameters import (
    batch_weights,
    class_weights,
    data_parameter_loss,
    fixed_divisor,
    foreground_fraction,
    per_sample_cross_entropy,
)
from medmodal.methods.deepstaple.config import LR_DECAYS


def _correlation(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray, fn: Any) -> float:
    """``fn(a, b).statistic`` over the pairs where both values are finite; NaN with fewer than 3 such pairs or
    a constant side (the correlation is undefined)."""
    a, b = np.asarray(x, np.float64), np.asarray(y, np.float64)
    keep = np.isfinite(a) & np.isfinite(b)
    if keep.sum() < 3 or np.ptp(a[keep]) == 0 or np.ptp(b[keep]) == 0:
        return float("nan")
    return float(fn(a[keep], b[keep]).statistic)


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Spearman rank correlation over the pairs where both values are finite (NaN if undefined)."""
    return _correlation(x, y, stats.spearmanr)


def pearson(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Pearson correlation over the finite pairs (NaN if undefined)."""
    return _correlation(x, y, stats.pearsonr)


class DeepStapleSystem(MethodSystem):
    """Train a segmentation network on candidate labels while learning one data parameter per label.

    Args:
        network: ``forward(image (B, M, *S), available (B, M)) -> logits (B, 2, *S)`` (softmax background /
            foreground), 2D or 3D; any registered network.
        foreground_voxels: ``(N,)`` foreground voxel count ``n_j`` of each training label (fixed weighting).
        class_voxels: ``(C,)`` voxel count per class over all training labels (class weights).
        true_dice: ``(N,)`` known quality of each label (NaN where unknown) or ``None``; when some are known,
            ``train/spearman_theta_dice`` is logged at the end of every epoch.
        dp_update: ``"ool"`` (two-step, the paper) or ``"inline"``.
        risk_regularization: add the risk term ``R`` to ``L_dp``.
        fixed_weighting: ``"log_fg"`` divides the weights by ``φ(n_j) = ln(n_j + e) + e``; ``"off"``.
        dp_loss_class_weights: class-weight ``ℓ_b`` in ``L_dp`` (the official code does not).
        dp_lr: SparseAdam learning rate of θ (0.1).
        class_weight_exponent: ``w_c ∝ N_c^(-exponent)``.
        ce_normalisation: the model step's class-weighted CE ``Σ_i w_{y_i} ℓ_i`` over the batch's voxels is
            divided by ``Σ_i w_{y_i}`` (``"weight_sum"``: torch's ``F.cross_entropy(weight=w)``, the official
            code) or by the number of voxels (``"voxel_mean"``; its scale then moves with the batch's foreground
            share). In multi-process training the divisor is that of the global batch.
        optimizer, lr, weight_decay, momentum: network optimiser (``"adamw"`` or Nesterov ``"sgd"``).
        schedule, max_steps: ``lr_factor`` schedule per step when ``lr_decay="schedule"``.
        lr_decay: exponential decay by ``lr_gamma``: ``"every_kth_epoch_per_batch"`` (every batch, but only in
            epochs that are multiples of ``lr_decay_every``: the official code), ``"per_epoch"`` (once at the
            end of every epoch) or ``"per_batch"``; ``"schedule"`` follows ``schedule`` instead.
        roi_size, overlap, sw_batch_size: sliding-window validation.
        callbacks: extra callbacks this system brings to the Trainer (e.g. one that writes θ at the end).

    Batches: ``{"image" (B, M, *S) float, "available" (B, M) bool, "label" (B, *S) long in {0, 1},
    "label_id" (B,) long}`` for training; ``{"image", "available", "reference" (B, *S) long,
    "has_reference" (B,) bool}`` for validation.
    """

    def __init__(
        self,
        *,
        network: nn.Module,
        foreground_voxels: Sequence[int] | torch.Tensor,
        class_voxels: Sequence[int] | torch.Tensor,
        true_dice: Sequence[float] | torch.Tensor | None = None,
        dp_update: Literal["ool", "inline"] = "ool",
        risk_regularization: bool = True,
        fixed_weighting: Literal["log_fg", "off"] = "log_fg",
        dp_loss_class_weights: bool = False,
        dp_lr: float = 0.1,
        class_weight_exponent: float = 0.35,
        ce_normalisation: Literal["weight_sum", "voxel_mean"] = "weight_sum",
        optimizer: Literal["adamw", "sgd"] = "adamw",
        lr: float = 0.01,
        weight_decay: float = 1e-4,
        momentum: float = 0.99,
        schedule: Literal["poly", "cosine", "constant"] = "constant",
        max_steps: int = 1000,
        lr_decay: Literal["every_kth_epoch_per_batch", "per_epoch", "per_batch", "schedule"] = (
            "every_kth_epoch_per_batch"),
        lr_gamma: float = 0.99,
        lr_decay_every: int = 10,
        roi_size: Sequence[int],
        overlap: float = 0.25,
        sw_batch_size: int = 2,
        callbacks: Sequence[L.Callback] = (),
    ) -> None:
        super().__init__(seed=0)
        if dp_update not in ("ool", "inline"):
            raise ValueError(f"dp_update must be 'ool' or 'inline', got {dp_update!r}")
        if fixed_weighting not in ("log_fg", "off"):
            raise ValueError(f"fixed_weighting must be 'log_fg' or 'off', got {fixed_weighting!r}")
        if lr_decay not in LR_DECAYS:
            raise ValueError(f"lr_decay must be one of {', '.join(LR_DECAYS)}, got {lr_decay!r}")
        if ce_normalisation not in ("weight_sum", "voxel_mean"):
            raise ValueError(f"ce_normalisation must be 'weight_sum' or 'voxel_mean', got {ce_normalisation!r}")
        self.automatic_optimization = False
        # θ is updated identically on every rank from the gathered global batch (see _dp_loss), not by DDP
        self._ddp_params_and_buffers_to_ignore = ["data_parameters.weight"]
        self.network = network
        fg = torch.as_tensor(foreground_voxels, dtype=torch.float64)
        if fg.ndim != 1 or fg.numel() == 0:
            raise ValueError("foreground_voxels must be a non-empty (N,) sequence: one count per training label")
        n = fg.numel()
        self.data_parameters = nn.Embedding(n, 1, sparse=True)
        nn.init.zeros_(self.data_parameters.weight)
        self.register_buffer("phi", fixed_divisor(fg))
        self.register_buffer("class_weight", class_weights(torch.as_tensor(class_voxels),
                                                           exponent=class_weight_exponent))
        dice = torch.full((n,), float("nan")) if true_dice is None else torch.as_tensor(true_dice).float()
        if dice.shape != (n,):
            raise ValueError(f"true_dice must have one value per training label ({n}), got {tuple(dice.shape)}")
        self.register_buffer("true_dice", dice)
        self.dp_update, self.risk_regularization = dp_update, risk_regularization
        self.fixed_weighting, self.dp_loss_class_weights, self.dp_lr = fixed_weighting, dp_loss_class_weights, dp_lr
        self.ce_normalisation = ce_normalisation
        self.optimizer_name, self.lr, self.weight_decay, self.momentum = optimizer, lr, weight_decay, momentum
        self.schedule, self.max_steps = schedule, max_steps
        self.lr_decay, self.lr_gamma, self.lr_decay_every = lr_decay, lr_gamma, lr_decay_every
        self.roi_size = tuple(int(s) for s in roi_size)
        self.overlap, self.sw_batch_size = overlap, sw_batch_size
        self._callbacks = list(callbacks)

    # -- data parameters ------------------------------------------------------------------------------------
    @property
    def theta(self) -> torch.Tensor:
        """``(N,)`` current data parameters (a detached copy)."""
        return self.data_parameters.weight.detach()[:, 0].clone()

    def theta_spearman(self) -> float:
        """Spearman correlation between θ and the known true Dice of the labels (NaN if unknown)."""
        return spearman(self.theta.cpu().numpy(), self.true_dice.cpu().numpy())

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` of every rank, concatenated in rank order (the global batch); ``t`` itself in one process."""
        if self._trainer is None or self.trainer.world_size == 1:
            return t
        return self.all_gather(t).flatten(0, 1)

    def _dp_loss(self, logits: torch.Tensor, label: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(L_dp for θ (ℓ detached), per-sample ℓ (with graph), detached weights of this rank's samples)``.

        ``L_dp`` and the weights are those of the **global** batch: in multi-process training every rank gathers
        the batch's label ids, losses and foreground fractions and computes the same θ update (θ is not
        synchronised by DDP), so θ stays identical on every rank and equals the one-process θ. The returned
        weights are scaled by the world size, so that DDP's gradient average of ``Σ_local w_b ℓ_b`` is the
        global ``Σ_b w_b ℓ_b``.
        """
        weight = self.class_weight if self.dp_loss_class_weights else None
        sample_loss = per_sample_cross_entropy(logits, label, weight=weight)
        all_ids = self._gather(ids)
        theta = self.data_parameters(all_ids)[:, 0].float()
        divisor = self.phi[all_ids] if self.fixed_weighting == "log_fg" else None
        loss = data_parameter_loss(theta, self._gather(sample_loss.detach()), self._gather(foreground_fraction(logits)),
                                   divisor=divisor, risk=self.risk_regularization)
        w = batch_weights(theta.detach(), divisor)
        world = 1 if self._trainer is None else self.trainer.world_size
        if world > 1:
            b = len(ids)
            w = w[self.global_rank * b : (self.global_rank + 1) * b] * world
        return loss, sample_loss, w

    # -- steps ----------------------------------------------------------------------------------------------
    def configure_callbacks(self) -> list[L.Callback]:
        return self._callbacks

    def forward(self, image: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        return self.network(image, available)

    def model_loss(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """The model step's class-weighted cross-entropy of ``logits (B, 2, *S)`` against ``label (B, *S)``.

        ``Σ_i w_{y_i} ℓ_i / Σ_i w_{y_i}`` over the batch's voxels with ``ce_normalisation="weight_sum"`` (equal to
        ``F.cross_entropy(logits, label, weight=w)``; in multi-process training the divisor is the global batch's
        divided by the world size, so that DDP's gradient average is that of the global batch), or
        ``Σ_i w_{y_i} ℓ_i / #voxels`` with ``"voxel_mean"``.
        """
        if self.ce_normalisation == "voxel_mean":
            return per_sample_cross_entropy(logits, label, weight=self.class_weight).mean()
        w = self.class_weight.float()
        target = label.long()
        weighted = F.cross_entropy(logits.float(), target, weight=w, reduction="none")  # w_{y_i} ℓ_i
        divisor = w[target].sum()
        world = 1 if self._trainer is None else self.trainer.world_size
        if world > 1:
            divisor = self._gather(divisor.detach()[None]).sum() / world
        return weighted.sum() / divisor

    def model_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """OOL step 1: class-weighted CE (:meth:`model_loss`), one network optimiser step. Returns the loss
        (detached)."""
        opt_net = self.optimizers()[0]
        logits = self.network(batch["image"], batch["available"])
        loss = self.model_loss(logits, batch["label"])
        opt_net.zero_grad()
        self.manual_backward(loss)
        opt_net.step()
        return loss.detach()

    def dp_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """OOL step 2: frozen network (train mode, no graph), one SparseAdam step on the batch's θ rows."""
        theta_opt = self.optimizers()[1].optimizer
        with torch.no_grad():
            logits = self.network(batch["image"], batch["available"])
        loss, _, _ = self._dp_loss(logits, batch["label"], batch["label_id"])
        theta_opt.zero_grad(set_to_none=True)
        loss.backward()
        theta_opt.step()
        return loss.detach()

    def inline_step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward; ``L_dp`` steps the network and θ (their gradients are those of the joint loss)."""
        opt_net, theta_opt = self.optimizers()[0], self.optimizers()[1].optimizer
        logits = self.network(batch["image"], batch["available"])
        dp_loss, sample_loss, w = self._dp_loss(logits, batch["label"], batch["label_id"])
        net_loss = (w * sample_loss).sum()  # ∂L_dp/∂network: the risk term carries no network gradient
        opt_net.zero_grad()
        theta_opt.zero_grad(set_to_none=True)
        self.manual_backward(net_loss)
        dp_loss.backward()
        opt_net.step()
        theta_opt.step()
        return net_loss.detach(), dp_loss.detach()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        if self.dp_update == "ool":
            loss = self.model_step(batch)
            dp_loss = self.dp_step(batch)
        else:
            loss, dp_loss = self.inline_step(batch)
        self._step_schedule(batch_idx)
        n = len(batch["label_id"])
        self.log("train/loss", loss, prog_bar=True, batch_size=n, sync_dist=True)
        self.log("train/dp_loss", dp_loss, batch_size=n)
        if self._trainer is not None and batch_idx + 1 == self.trainer.num_training_batches:
            rho = self.theta_spearman()
            if math.isfinite(rho):
                self.log("train/spearman_theta_dice", rho, batch_size=n)
            self.log("train/theta_std", self.theta.std(), batch_size=n)

    def _step_schedule(self, batch_idx: int) -> None:
        sched = self.lr_schedulers()
        if sched is None:
            return
        if self.lr_decay == "every_kth_epoch_per_batch":
            step = self.current_epoch % self.lr_decay_every == 0
        elif self.lr_decay == "per_epoch":
            step = self._trainer is not None and batch_idx + 1 == self.trainer.num_training_batches
        else:  # "per_batch" and "schedule": every batch
            step = True
        if step:
            sched.step()

    def val_metric_names(self) -> Sequence[str]:
        return ["dice"]

    progress_metrics = ("dice",)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        weight = batch.get("weight", torch.ones(len(batch["image"])))
        for i in range(len(batch["image"])):
            if not bool(batch["has_reference"][i]) or float(weight[i]) == 0:
                continue
            logits = predict_subsets(
                self.network, batch["image"][i : i + 1], batch["available"][i : i + 1],
                roi_size=self.roi_size, overlap=self.overlap, sw_batch_size=self.sw_batch_size, activation="softmax",
            )
            dice = binary_dice(logits[0].argmax(0) != 0, batch["reference"][i] != 0)
            self.add_val_metric("dice", dice, weight[i])

    # -- optimisation ---------------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        opt = make_optimizer(self.network.parameters(), name=self.optimizer_name, lr=self.lr,
                             weight_decay=self.weight_decay, momentum=self.momentum)
        theta_opt = torch.optim.SparseAdam(self.data_parameters.parameters(), lr=self.dp_lr, betas=(0.9, 0.999))
        if self.lr_decay != "schedule":
            sched: torch.optim.lr_scheduler.LRScheduler = torch.optim.lr_scheduler.ExponentialLR(
                opt, gamma=self.lr_gamma)
        else:
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, functools.partial(lr_factor, schedule=self.schedule, total=max(1, self.max_steps))
            )
        return [opt, theta_opt], [{"scheduler": sched, "interval": "step"}]
