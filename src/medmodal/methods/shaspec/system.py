"""The ShaSpec training system (Wang et al., *Multi-modal Learning with Missing Modality via Shared-Specific
Feature Modelling*, CVPR 2023).

Loss: ``L = L_task + alpha * L_dao + beta * L_dco`` (alpha = 0.1, beta = 0.02 in paper and code), the task being
region segmentation (soft Dice + BCE on WT/TC/ET) or classification (cross-entropy). Missing modalities during
training come from a subset sampler:

* **non-dedicated** training (one model for every subset): a random non-empty subset per sample (or per batch,
  as the released code), drawn ``by_size`` (the code) or ``uniform``ly; optionally after a full-modality
  warm-up phase — the released recipe trains 80k iterations with all modalities, then 100k with random subsets,
  and the author advises the warm-up (billhhh/ShaSpec#4, #7);
* **dedicated** training: one fixed subset, for training and evaluation.

With a network built with ``missing_fill="first"`` (the released code's fill), the system also draws, per
training sample, the random available modality whose shared feature fills the missing slots (the code takes the
first of its shuffled subset list), from the same seeded per-rank generator as the subsets; validation and
evaluation call the network without a draw, which then uses the first available modality in modality order.

The network is any model with ShaSpec's ``forward_features(image, available)`` (see
:class:`medmodal.networks.shaspec.ShaSpecNet`); the system owns everything else.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from medmodal.data.case import Batch
from medmodal.engine.system import lr_factor
from medmodal.losses.shaspec import DaoForm, DaoPairs, dao_loss, dco_loss
from medmodal.methods.zero_fill.system import SegmentationSystem
from medmodal.transforms import drop_modalities, labels_to_regions, sample_modality_subsets


class ShaSpecSystem(SegmentationSystem):
    """Train a ShaSpec network for segmentation or classification with missing modalities.

    Args:
        network: a ShaSpec network (``forward_features`` returning logits, class logits, shared, specific and
            domain logits; ``modalities``; ``missing_input``).
        regions: region name → label values (segmentation channels).
        task: ``"segmentation"`` or ``"classification"`` (uses the case's integer ``target``).
        alpha, beta: weights of the distribution-alignment (DAO) and domain-classification (DCO) losses.
        dao_form, dao_pairs: see :func:`medmodal.losses.shaspec.dao_loss`.
        aux_on_missing: also apply DAO/DCO to missing (zero-encoded) modalities, as the released code does;
            needs a network built with ``missing_input="zero"``.
        subset_sampler, sample_per: how random subsets are drawn
            (:func:`medmodal.transforms.sample_modality_subsets`).
        dedicated: a fixed subset of modality names (dedicated training) or ``None`` (non-dedicated).
        phases: ``[(steps, "full" | "random"), ...]`` in order; ``None`` means random subsets throughout.
        phase_schedule: ``"continuous"`` (one schedule over all steps) or ``"restart"`` (each phase's schedule
            ends at that phase's end, as the released code; see :meth:`lr_multiplier`).
        **kwargs: optimisation and validation settings of :class:`SegmentationSystem`.
    """

    def __init__(
        self,
        *,
        network: nn.Module,
        regions: Mapping[str, Sequence[int]],
        task: Literal["segmentation", "classification"] = "segmentation",
        alpha: float = 0.1,
        beta: float = 0.02,
        dao_form: DaoForm = "l1_pairs",
        dao_pairs: DaoPairs = "cyclic",
        aux_on_missing: bool = False,
        subset_sampler: Literal["by_size", "uniform"] = "by_size",
        sample_per: Literal["sample", "batch"] = "sample",
        dedicated: Sequence[str] | None = None,
        phases: Sequence[tuple[int, str]] | None = None,
        phase_schedule: Literal["continuous", "restart"] = "continuous",
        **kwargs: Any,
    ) -> None:
        super().__init__(network=network, regions=regions, modality_dropout=1.0, **kwargs)
        if not hasattr(network, "forward_features"):
            raise ValueError(f"ShaSpec needs a ShaSpec network (with forward_features); got {type(network).__name__}")
        if aux_on_missing and getattr(network, "missing_input", "skip") != "zero":
            raise ValueError("aux_on_missing needs a network built with missing_input='zero' (as the released code)")
        if task not in ("segmentation", "classification"):
            raise ValueError(f"task must be segmentation or classification, got {task!r}")
        self.task = task
        self.alpha, self.beta = float(alpha), float(beta)
        self.dao_form, self.dao_pairs = dao_form, dao_pairs
        self.aux_on_missing = aux_on_missing
        self.subset_sampler, self.sample_per = subset_sampler, sample_per
        modalities = tuple(network.modalities)
        self.dedicated_mask: torch.Tensor | None = None
        if dedicated is not None:
            unknown = sorted(set(dedicated) - set(modalities))
            if unknown or not dedicated:
                raise ValueError(
                    f"dedicated subset {list(dedicated)}: unknown {unknown}; choose from {list(modalities)}"
                )
            self.dedicated_mask = torch.tensor([m in dedicated for m in modalities], dtype=torch.bool)
        self.phases = [(int(n), str(kind)) for n, kind in (phases or [])]
        for _, kind in self.phases:
            if kind not in ("full", "random"):
                raise ValueError(f"phase sampler must be full or random, got {kind!r}")
        if phase_schedule not in ("continuous", "restart"):
            raise ValueError(f"phase_schedule must be continuous or restart, got {phase_schedule!r}")
        self.phase_schedule = phase_schedule

    # -- schedule -----------------------------------------------------------------------------------------
    def lr_multiplier(self, step: int) -> float:
        """The recipe's schedule; with ``phase_schedule="restart"`` each phase decays to zero at its own end.

        ``restart`` reproduces the released code, which trains each phase as a new run whose schedule spans
        iteration 0 to the end of that phase: phase 1 decays over its 80k steps, then phase 2 evaluates the
        schedule over 180k at iteration 80k, so the learning rate jumps from ~0 back to
        ``lr * (100/180)^0.9`` (about 0.59 lr) — a warm restart (spec §2.6).
        """
        if self.phase_schedule == "continuous" or not self.phases:
            return super().lr_multiplier(step)
        end, _ = self._phase(step)
        return lr_factor(step, schedule=self.schedule, total=max(1, end))

    # -- which modalities a training sample sees ----------------------------------------------------------
    def _phase(self, step: int) -> tuple[int, str]:
        """``(end step, sampler)`` of the phase in force at ``step`` (the last phase beyond the end; needs
        phases)."""
        end = 0
        for n, kind in self.phases:
            end += n
            if step < end:
                return end, kind
        return end, self.phases[-1][1]

    def phase_at(self, step: int) -> str:
        """``"full"`` or ``"random"``: the subset sampler in force at optimiser step ``step``."""
        return self._phase(step)[1] if self.phases else "random"

    def training_keep(self, available: torch.Tensor, step: int) -> torch.Tensor:
        """``(B, M) bool``: the modalities each sample of a training batch sees at ``step``."""
        if self.dedicated_mask is not None:
            keep = available & self.dedicated_mask.to(available.device)
            if not bool(keep.any(1).all()):
                raise ValueError("a training sample has none of the dedicated modalities")
            return keep
        if self.phase_at(step) == "full":
            return available
        return sample_modality_subsets(
            available, p=1.0, sampler=self.subset_sampler, per=self.sample_per, generator=self.generator
        )

    def draw_fill_source(self, keep: torch.Tensor) -> torch.Tensor | None:
        """``(B,) long``: a uniformly random modality among each sample's ``keep (B, M)``, drawn from
        :attr:`generator`, for a network with ``missing_fill="first"``; ``None`` for any other network (and then
        nothing is drawn, so the other random streams are unchanged)."""
        if getattr(self.network, "missing_fill", None) != "first":
            return None
        scores = torch.rand(keep.shape, generator=self.generator).to(keep.device)
        return scores.masked_fill(~keep.to(torch.bool), -1.0).argmax(1)

    # -- losses -------------------------------------------------------------------------------------------
    def losses(
        self, batch: Batch, keep: torch.Tensor, *, fill_source: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Task, DAO, DCO and total loss of ``batch`` seen with modalities ``keep (B, M)``; ``fill_source``
        (``(B,)``, see :meth:`draw_fill_source`) picks the modality that fills missing slots."""
        extra = {} if fill_source is None else {"fill_source": fill_source}
        out = self.network.forward_features(batch.image, keep, **extra)
        if self.task == "segmentation":
            if batch.label is None:
                raise ValueError(f"segmentation training needs labelled cases; unlabelled: {batch.case_id}")
            task = self.loss_fn(out.logits, labels_to_regions(batch.label, self.regions))
        else:
            if batch.target is None:
                raise ValueError(f"classification training needs a target per case; missing in {batch.case_id}")
            task = F.cross_entropy(out.class_logits, batch.target.long())
        aux = torch.ones_like(keep) if self.aux_on_missing else keep
        zero = task.new_zeros(())
        dao = dao_loss(out.shared, aux, form=self.dao_form, pairs=self.dao_pairs) if self.alpha else zero
        dco = dco_loss(out.domain_logits, aux) if self.beta else zero
        return {"loss": task + self.alpha * dao + self.beta * dco, "task": task, "dao": dao, "dco": dco}

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        keep = self.training_keep(batch.available, self.global_step)
        parts = self.losses(batch, keep, fill_source=self.draw_fill_source(keep))
        n = len(batch)
        self.log("train/loss", parts["loss"], prog_bar=True, batch_size=n, sync_dist=True)
        for name in ("task", "dao", "dco"):
            self.log(f"train/{name}", parts[name], batch_size=n)
        self.log("train/n_modalities", keep.sum(1).float().mean(), batch_size=n)
        self.log_lr()
        return parts["loss"]

    # -- validation ---------------------------------------------------------------------------------------
    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        if self.dedicated_mask is not None:
            batch = drop_modalities(batch, batch.available & self.dedicated_mask.to(batch.available.device))
        if self.task == "segmentation":
            return super().validation_step(batch, batch_idx)
        if batch.target is None:
            return None
        weight = batch.weight if batch.weight is not None else torch.ones(len(batch))
        logits = torch.cat(
            [self.network(batch.image[i : i + 1], batch.available[i : i + 1]) for i in range(len(batch))]
        )
        correct = (logits.argmax(1) == batch.target.long()).double()
        self.add_val_metric("accuracy", correct, weight)
        return None

    def val_metric_names(self) -> Sequence[str]:
        return ["accuracy"] if self.task == "classification" else super().val_metric_names()

    @property
    def progress_metrics(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("accuracy",) if self.task == "classification" else ("dice_mean",)
