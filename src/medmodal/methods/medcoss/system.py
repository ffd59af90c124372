"""MedCoSS's training system for one stage (``shared/methods/medcoss.md`` §2.3, §2.4, §2.6).

Every batch is one modality (:mod:`.data`); the loss depends on where it came from (invariant 7):

* **the current stage's data** -> its pretext task: MAE for images (keep ``⌊L (1 - mask_ratio)⌋`` tokens per
  sample, per-patch normalised targets, MSE on the masked patches) or masked language modelling for text (whole-word
  masking, cross-entropy with ignore index -100);
* **an earlier modality's rehearsal buffer** -> feature distillation: the batch goes through intra-modal mixup
  (texts first corrupted by the same whole-word masking), then student and frozen teacher encode it (images with the
  same kept tokens) and the loss is the mean squared difference of their output tokens. No pretext loss, so the MAE
  decoders and the MLM head get no gradient from buffer batches.

The pure model is the encoder (``network``, saved as the run's weights); the MAE decoder of each image kind and the
MLM head are the system's and fresh every stage; the teacher is the previous stage's encoder, frozen and (switch
``teacher_mode``) kept in eval mode so its targets are deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from medmodal.engine.system import MethodSystem


def medcoss_lr_factor(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """The learning-rate multiplier at optimiser step ``step`` (spec §2.6, invariant 10): linear from 0 over
    ``warmup_steps``, then a half cosine to 0 at ``total_steps``."""
    if step < warmup_steps:
        return step / warmup_steps
    rest = max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup_steps, rest) / rest))


def weight_decay_groups(modules: Sequence[nn.Module], weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: ``weight_decay`` on weight matrices and kernels, none on biases, norms and other
    one-dimensional parameters (the MAE recipe the spec follows)."""
    decay, no_decay = [], []
    for module in modules:
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class MedCoSSSystem(MethodSystem):
    """Train the shared encoder on one stage (module doc).

    Args:
        network: the student encoder (:class:`~medmodal.networks.medcoss.MedCoSSEncoder`).
        heads: the pretext heads of the kinds trained by pretext in this run: ``"image2d"`` / ``"image3d"``
            :class:`~medmodal.networks.medcoss.MAEDecoder`, ``"text"`` :class:`~medmodal.networks.medcoss.MLMHead`.
        teacher: the previous stage's encoder (frozen here), or ``None`` (first stage, no buffers).
        text: the text tokenizer's ``mask_id``, ``vocab_size`` and ``special_ids`` (for whole-word masking), or
            ``None`` without text.
        val_names: the validation metrics (``<source>_mae`` / ``_mlm`` / ``_kd``).
        mask_ratio, norm_pix, mlm_probability: the pretext tasks; mixup: intra-modal mixup of buffer batches;
        teacher_mode: ``"eval"`` or ``"train"`` (the released code's stochastic teacher).
        lr, weight_decay, betas, warmup_steps, max_steps: AdamW and the warm-up + cosine schedule.
        seed: the per-rank random stream (masks, mixup).
    """

    def __init__(
        self,
        *,
        network: nn.Module,
        heads: dict[str, nn.Module],
        teacher: nn.Module | None,
        text: dict[str, Any] | None,
        val_names: Sequence[str],
        mask_ratio: float = 0.75,
        norm_pix: bool = True,
        mlm_probability: float = 0.15,
        mixup: bool = True,
        teacher_mode: Literal["eval", "train"] = "eval",
        lr: float = 3e-4,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 0,
        max_steps: int = 1000,
        seed: int = 0,
    ) -> None:
        super().__init__(seed=seed)
        self.network = network
        self.heads = nn.ModuleDict(heads)
        self.teacher = teacher
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.train(teacher_mode == "train")
        self.text = text
        self.val_names = list(val_names)
        self.mask_ratio, self.norm_pix, self.mlm_probability = mask_ratio, norm_pix, mlm_probability
        self.mixup, self.teacher_mode = mixup, teacher_mode
        self.lr, self.weight_decay, self.betas = lr, weight_decay, tuple(betas)
        self.warmup_steps, self.max_steps = warmup_steps, max_steps

    progress_metrics = ()

    def val_metric_names(self) -> Sequence[str]:
        return self.val_names

    def setup(self, stage: str) -> None:
        import warnings

        # the frozen teacher is in eval mode on purpose (teacher_mode: eval)
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")

    def train(self, mode: bool = True) -> MedCoSSSystem:
        super().train(mode)
        if self.teacher is not None:  # the teacher's mode is the switch's, whatever Lightning asks of the system
            self.teacher.train(self.teacher_mode == "train")
        return self

    # -- the three losses --------------------------------------------------------------------------------
    def _mask_text(self, batch: dict[str, Any], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        from medmodal.data.text import whole_word_mask

        if self.text is None:
            raise ValueError(f"a text batch ({batch['source']}) but the model has no text tokenizer")
        return whole_word_mask(batch["ids"], batch["word_ids"], batch["mask"], mask_id=self.text["mask_id"],
                               vocab_size=self.text["vocab_size"], special_ids=self.text["special_ids"],
                               generator=generator, p=self.mlm_probability)

    def pretext_loss(self, batch: dict[str, Any], generator: torch.Generator, *, return_count: bool = False) -> Any:
        """MAE (images) or MLM (text) loss of a current-stage batch (and, with ``return_count``, the number of
        positions it averages: masked tokens or masked patches)."""
        from medmodal.losses.medcoss import mae_loss, mlm_loss, patchify, random_keep

        kind = batch["kind"]
        if kind == "text":
            input_ids, labels = self._mask_text(batch, generator)
            tokens = self.network.tokenize("text", input_ids, batch["mask"])
            loss = mlm_loss(self.heads["text"](self.network.encode(tokens)), labels)
            return (loss, int((labels != -100).sum())) if return_count else loss
        x = batch["x"]
        tokens = self.network.tokenize(kind, x)
        draw = random_keep(x.shape[0], math.prod(tokens.grid), ratio=self.mask_ratio, generator=generator,
                           device=x.device)
        encoded = self.network.encode(tokens, keep=draw.keep)
        pred = self.heads[kind](encoded, draw.keep, tokens.grid)
        target = patchify(self.network.image_input(kind, x), self.network.patch_size(kind))
        loss = mae_loss(pred, target, draw.mask, norm_pix=self.norm_pix)
        return (loss, int(draw.mask.sum())) if return_count else loss

    def distillation(self, batch: dict[str, Any], generator: torch.Generator, *, mixup: bool | None = None
                     ) -> torch.Tensor:
        """Feature distillation of a buffer batch against the teacher (same mixed input, same kept tokens);
        ``mixup`` overrides the system's switch (validation measures the plain items)."""
        from medmodal.losses.medcoss import distillation_loss, random_keep
        from medmodal.transforms.mixup import mix_images, mix_tokens

        if self.teacher is None:
            raise ValueError(f"a buffer batch ({batch['source']}) but no teacher (the first stage has no buffers)")
        mix = self.mixup if mixup is None else mixup
        kind = batch["kind"]
        if kind == "text":
            ids, _ = self._mask_text(batch, generator)  # buffer texts arrive MLM-corrupted (spec §2.3)
            mask = batch["mask"]
            if mix:
                ids, mask, _, _ = mix_tokens(ids, mask, generator=generator)
            student = self.network.encode(self.network.tokenize("text", ids, mask))
            with torch.no_grad():
                teacher = self.teacher.encode(self.teacher.tokenize("text", ids, mask))
            real = mask.bool().unsqueeze(-1)  # padding is no feature to distil
            return distillation_loss(student * real, teacher * real)
        x = batch["x"]
        if mix:
            x, _, _ = mix_images(x, generator=generator)
        tokens = self.network.tokenize(kind, x)
        draw = random_keep(x.shape[0], math.prod(tokens.grid), ratio=self.mask_ratio, generator=generator,
                           device=x.device)
        student = self.network.encode(tokens, keep=draw.keep)
        with torch.no_grad():
            teacher = self.teacher.encode(self.teacher.tokenize(kind, x), keep=draw.keep)
        return distillation_loss(student, teacher)

    def batch_loss(self, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        """The loss of one batch, routed by its role (invariant 7)."""
        if batch["role"] == "current":
            return self.pretext_loss(batch, generator)
        return self.distillation(batch, generator)

    # -- steps -------------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.batch_loss(batch, self.generator)
        n = int((batch.get("x") if "x" in batch else batch["ids"]).shape[0])
        what = "kd" if batch["role"] == "buffer" else ("mlm" if batch["kind"] == "text" else "mae")
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log(f"train/{batch['source']}_{what}", loss, batch_size=n)
        if self._trainer is not None and self.trainer.optimizers:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=1)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Each item on its own with its own draws (seeded by its slot and place in the global batch) and no mixup,
        so a validation over several processes equals the one-process one; weighted by the positions it scores."""
        n = int(batch["slot"].shape[0])
        for i in range(n):
            item = {k: (v[i : i + 1] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
            generator = torch.Generator().manual_seed(
                (self.seed * 1_000_003 + int(batch["slot"][i])) * 4_099 + int(batch["pos"][i]))
            if batch["role"] == "buffer":
                loss, weight, what = self.distillation(item, generator, mixup=False), 1.0, "kd"
            elif batch["kind"] == "text":
                loss, weight = self.pretext_loss(item, generator, return_count=True)
                what = "mlm"
            else:
                loss, weight = self.pretext_loss(item, generator, return_count=True)
                what = "mae"
            if weight:
                self.add_val_metric(f"{batch['source']}_{what}", loss.detach(), weight)

    def configure_optimizers(self) -> Any:
        groups = weight_decay_groups([self.network, self.heads], self.weight_decay)
        opt = torch.optim.AdamW(groups, lr=self.lr, betas=self.betas)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: medcoss_lr_factor(step, warmup_steps=self.warmup_steps, total_steps=self.max_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
