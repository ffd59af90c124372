"""The MultiMix training system: supervised + FixMatch classification, Dice + KL segmentation, one network.

Paper: A. Haque, A.-A.-Z. Imran, A. Wang, D. Terzopoulos, *MultiMix: Sparingly-Supervised, Extreme Multitask
Learning From Medical Images*, ISBI 2021 (spec ``shared/methods/multimix.md`` §2.2–2.5). One step:

    L = w_cls · CE(ĉ(x_l^c), c) + w_dice · Dice(ŷ(x_l^s), y) + w_u · FixMatch(ĉ(strong(x_u)), ĉ(weak(x_u)))
        + w_kl · KL(σ(ŷ(x_l^s)) ‖ σ(ŷ(x_u^s)))

The weak view's logits are computed under ``no_grad`` (the pseudo-label carries no gradient). Segmentation
images go through :meth:`~medmodal.networks.multimix.MultiMixNet.multitask` (saliency pass, encoder, decoder);
classification images through the encoder and head only. The released code runs both heads on all five streams
in one pass; the outputs it then discards (segmentation of classification images, class scores of segmentation
images other than through the saliency) enter no loss, so the gradients are the same.

Validation: mean Dice over regions (cases with a mask), accuracy (cases with a class label), and ``score`` =
their sum (or the one the variant trains), which ``model_selection: validation`` maximises.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from medmodal.engine.system import MethodSystem, make_optimizer, stepped_schedule
from medmodal.losses.multimix import dice_loss, fixmatch_loss, segmentation_kl


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] → [0, 1] (``input_scaling: faithful``'s classification streams and test inputs)."""
    return (x + 1.0) * 0.5


def memory_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``x`` in channels-last order (``channels_last`` / ``_3d`` by its rank) when asked: PyTorch's CPU
    convolutions and instance norms run 1.1-1.3x faster so (benchmarks/multimix.py, docs/benchmarks.md)."""
    if not channels_last or x.dim() not in (4, 5):
        return x
    return x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)


def multitask_outputs(network: nn.Module, image: torch.Tensor, available: torch.Tensor) -> Any:
    """``network.multitask`` on ``image`` where autograd may be off (validation, evaluation): the saliency needs a
    gradient with respect to the input, which ``torch.inference_mode`` forbids, so it is left for the call."""
    with torch.inference_mode(False):
        return network.multitask(image.clone(), available.clone())


class MultiMixSystem(MethodSystem):
    """Train a :class:`~medmodal.networks.multimix.MultiMixNet` on the five streams of
    :class:`~medmodal.methods.multimix.data.StreamSteps`.

    Args:
        network: the pure network (``multitask``, ``classify``).
        classify, segment, semi_supervised: what the variant trains (spec §4's table).
        weight_cls, weight_dice, weight_fixmatch, weight_kl: the loss weights (code: 1, 5, 0.25, 0.01).
        tau, fixmatch_norm: FixMatch's confidence threshold and normalisation (``batch``: over all unlabelled).
        seg_kl: ``bernoulli`` | ``faithful_zero`` | ``none`` (spec §2.3).
        input_scaling: ``unified`` or ``faithful`` (classification streams in [0, 1]).
        optimizer, lr, weight_decay, momentum, warmup_steps, max_steps: optimisation (spec: Adam, 1e-4).
        lr_decay: ``step`` (StepLR: × ``lr_gamma`` every ``lr_step_epochs`` passes over the unlabelled
            classification images, spec §2.4), ``cosine`` (to zero over ``max_steps``) or ``none``.
        channels_last: run the network in channels-last memory order.
        seed: the per-rank generator's seed.
    """

    progress_metrics = ("score",)

    def __init__(
        self,
        *,
        network: nn.Module,
        classify: bool,
        segment: bool,
        semi_supervised: bool,
        weight_cls: float = 1.0,
        weight_dice: float = 5.0,
        weight_fixmatch: float = 0.25,
        weight_kl: float = 0.01,
        tau: float = 0.7,
        fixmatch_norm: Literal["batch", "confident"] = "batch",
        seg_kl: Literal["bernoulli", "faithful_zero", "none"] = "bernoulli",
        input_scaling: Literal["unified", "faithful"] = "unified",
        optimizer: str = "adamw",
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        momentum: float = 0.99,
        warmup_steps: int = 0,
        max_steps: int = 1000,
        lr_decay: Literal["step", "cosine", "none"] = "step",
        lr_step_epochs: float = 8.0,
        lr_gamma: float = 0.1,
        channels_last: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(seed=seed)
        if not (classify or segment):
            raise ValueError("a MultiMix system trains classification, segmentation or both")
        self.network = network
        self.classify, self.segment, self.semi_supervised = classify, segment, semi_supervised
        self.weights = {"cls": weight_cls, "dice": weight_dice, "fixmatch": weight_fixmatch, "kl": weight_kl}
        self.tau, self.fixmatch_norm, self.seg_kl = tau, fixmatch_norm, seg_kl
        self.faithful_scaling = input_scaling == "faithful"
        self.optim = {"name": optimizer, "lr": lr, "weight_decay": weight_decay, "momentum": momentum}
        self.warmup_steps, self.max_steps = warmup_steps, max_steps
        self.lr_decay, self.lr_step_epochs, self.lr_gamma = lr_decay, lr_step_epochs, lr_gamma
        self.channels_last = channels_last
        self.decay_steps = 1  # set in setup(): lr_step_epochs passes over the unlabelled classification images

    def setup(self, stage: str) -> None:
        data = self.trainer.datamodule if self._trainer is not None else None
        epoch = getattr(data, "unlabelled_epoch_steps", 1)
        self.decay_steps = max(1, round(self.lr_step_epochs * epoch))
        if self.channels_last:
            dims = next(m for m in self.network.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d)))
            fmt = torch.channels_last if isinstance(dims, nn.Conv2d) else torch.channels_last_3d
            self.network.to(memory_format=fmt)

    # -- optimisation ----------------------------------------------------------------------------------------------
    def lr_multiplier(self, step: int) -> float:
        """The learning-rate factor at ``step`` (before warm-up)."""
        if self.lr_decay == "step":
            return self.lr_gamma ** (step // self.decay_steps)
        if self.lr_decay == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(step, self.max_steps) / self.max_steps))
        return 1.0

    def configure_optimizers(self) -> Any:
        opt = make_optimizer(self.network.parameters(), **self.optim)
        return stepped_schedule(opt, self.lr_multiplier, warmup_steps=self.warmup_steps)

    # -- training --------------------------------------------------------------------------------------------------
    def _cls_input(self, x: torch.Tensor) -> torch.Tensor:
        return memory_format(to_unit(x) if self.faithful_scaling else x, self.channels_last)

    def losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every loss term of one step (the weighted sum is ``"loss"``), plus ``"confident"`` (FixMatch's share of
        confident unlabelled images) for the log."""
        net = self.network
        zero = next(net.parameters()).sum() * 0.0
        terms: dict[str, torch.Tensor] = {}
        if self.segment:
            parts = [batch["seg_labelled_image"]]
            avail = [batch["seg_labelled_available"]]
            kl_on = self.semi_supervised and "seg_unlabelled_image" in batch
            if kl_on:
                parts.append(batch["seg_unlabelled_image"])
                avail.append(batch["seg_unlabelled_available"])
            out = net.multitask(memory_format(torch.cat(parts), self.channels_last), torch.cat(avail))
            n_l = parts[0].shape[0]
            seg_l = out.seg_logits[:n_l]
            terms["dice"] = dice_loss(seg_l, batch["seg_labelled_mask"].to(seg_l.dtype))
            terms["kl"] = (segmentation_kl(seg_l, out.seg_logits[n_l:], mode=self.seg_kl) if kl_on else zero)
        if self.classify:
            x_l = self._cls_input(batch["cls_labelled_image"])
            ssl = self.semi_supervised and "cls_strong_image" in batch
            if ssl:
                strong = self._cls_input(batch["cls_strong_image"])
                logits = net.classify(torch.cat([x_l, strong]),
                                      torch.cat([batch["cls_labelled_available"], batch["cls_unlabelled_available"]]))
                logits_l, logits_s = logits[: x_l.shape[0]], logits[x_l.shape[0]:]
                with torch.no_grad():
                    weak = net.classify(self._cls_input(batch["cls_weak_image"]), batch["cls_unlabelled_available"])
                fm = fixmatch_loss(logits_s, weak, tau=self.tau, norm=self.fixmatch_norm)
                terms["fixmatch"] = fm.loss
                terms["confident"] = fm.mask.float().mean().detach()
            else:
                logits_l = net.classify(x_l, batch["cls_labelled_available"])
                terms["fixmatch"] = zero
            terms["cls"] = F.cross_entropy(logits_l, batch["cls_labelled_target"])
        total = zero
        for name, w in self.weights.items():
            if name in terms and w:
                total = total + w * terms[name]
        terms["loss"] = total
        return terms

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        terms = self.losses(batch)
        b = next(iter(batch.values())).shape[0]
        for name, value in terms.items():
            self.log(f"train/{name}", value.detach(), prog_bar=name == "loss", batch_size=b)
        return terms["loss"]

    # -- validation ------------------------------------------------------------------------------------------------
    def val_metric_names(self) -> Sequence[str]:
        names = ["score"]
        if self.segment:
            names.append("dice")
        if self.classify:
            names.append("accuracy")
        return names

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        weight = batch["weight"].to(torch.float32)
        image = memory_format(to_unit(batch["image"]) if self.faithful_scaling else batch["image"], self.channels_last)
        out = multitask_outputs(self.network, image, batch["available"])
        score = torch.zeros_like(weight)
        if self.segment:
            from medmodal.evaluation.metrics import binary_dice

            pred = out.seg_logits.detach().sigmoid() > 0.5
            truth = batch["mask"] > 0.5
            dice = torch.tensor([sum(binary_dice(p[r], t[r]) for r in range(p.shape[0])) / p.shape[0]
                                 for p, t in zip(pred, truth, strict=True)])
            has = batch["has_mask"].to(torch.float32)
            self.add_val_metric("dice", dice, weight * has)
            score = score + dice * has
        if self.classify:
            has = (batch["target"] >= 0).to(torch.float32)
            correct = (out.class_logits.detach().argmax(1) == batch["target"]).to(torch.float32)
            self.add_val_metric("accuracy", correct, weight * has)
            score = score + correct * has
        self.add_val_metric("score", score, weight)
