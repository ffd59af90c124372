"""The PUMIT tokenizer stage: reconstruct crops of any dimension and spacing through soft tokens (spec §2.3).

Loss per step (LPIPS is off, the spec's offline switch ``perceptual: none``):

    L_G = L1(x, x̂) + w_q · Σ_k p̄_k log p̄_k + w_e · mean_i H(p_i)  (+ the VQ-VAE loss for ``quantizer: nearest``)
          (+ g · (−mean D(x̂)) with the optional discriminator, switch ``gan``)

with x = 2·crop − 1 and L1 over the crop's valid voxels (padding excluded). The prior terms are all-gathered over
the processes with the gradient kept for the local positions (``losses.pumit_prior``). Validation logs the L1 over
valid voxels per degree of anisotropy (``l1_da<k>``) and in all (``l1``), and per crop the codebook usage (share
of codes that are some position's most likely one) and the perplexity of p̄, averaged over crops.

With a discriminator D (``gan: true``; :mod:`medmodal.networks.pumit_discriminator`) each step also trains D by the
hinge loss × 0.5 on the real crop and the detached reconstruction, and the generator weight g is the gate's
(:class:`~medmodal.losses.pumit_tokenizer.GANGate`, invariant 10): ``w_g`` while max(EMA₀.₉(D loss), D loss) ≤
``use_gan_th``, else 0, from the D losses of the steps before (all-reduced, so every process gates alike). The
reconstruction's padding voxels are replaced by the crop's own before D sees them (D judges valid voxels only).
Generator and discriminator train in one backward pass: the generator's term goes through D with detached
parameters and D's loss through detached reconstructions, so each parameter gets exactly its own loss's gradient,
and one AdamW with two parameter groups (generator ``lr``, discriminator ``gan_lr``; the same weight decay and
schedule) equals two AdamW optimisers (its state is per parameter). That keeps Lightning's automatic optimisation:
one gradient all-reduce per step under DDP, one optimiser step per batch (``global_step``), one gradient scaler
under ``16-mixed``; gradient clipping clips each group's norm separately (the official ``max_norm_g`` /
``max_norm_d``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from medmodal.engine.system import MethodSystem, lr_factor, make_optimizer, stepped_schedule
from medmodal.losses.pumit_prior import codebook_usage, entropy_loss, quant_prior_loss
from medmodal.losses.pumit_tokenizer import GANGate, discriminator_hinge_loss, generator_gan_loss

#: the checkpoint key of the GAN gate's state.
GATE_KEY = "pumit_gan_gate"

#: the degrees of anisotropy a crop may have (0 = isotropic … 5 = a 2D image).
DAS = tuple(range(6))


def masked_l1(x: torch.Tensor, x_hat: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per-sample mean |x − x̂| over the valid voxels: ``(B,)``."""
    w = valid.to(x.dtype)
    return ((x - x_hat).abs() * w).flatten(1).sum(1) / w.flatten(1).sum(1).clamp_min(1.0)


class PUMITTokenizerSystem(MethodSystem):
    """Train a :class:`~medmodal.networks.pumit_tokenizer.PUMITTokenizer` on collection crops.

    Args:
        network: the tokenizer; weight_quant, weight_ent: the prior regularisers' weights (README: 0.03, 1.0).
        optimizer, lr, weight_decay, momentum, schedule, max_steps, warmup_steps: optimisation (spec: AdamW 1e-4,
            wd 0.05, cosine with warm-up).
        seed: the per-rank generator's seed.
        discriminator: a :class:`~medmodal.networks.pumit_discriminator.PUMITDiscriminator` to train the adversarial
            term with (``None``: no GAN, the spec's tiny-run switch ``gan: off``).
        gan_weight, gan_gate, gan_ema_decay: ``w_g``, ``use_gan_th`` and the EMA decay of the gate (3e-3, 0.025,
            0.9); gan_lr: the discriminator's learning rate (1e-3).
    """

    progress_metrics = ("l1",)

    def __init__(self, *, network: nn.Module, weight_quant: float, weight_ent: float, optimizer: str, lr: float,
                 weight_decay: float, momentum: float, schedule: str, max_steps: int, warmup_steps: int,
                 seed: int = 0, discriminator: nn.Module | None = None, gan_weight: float = 3e-3,
                 gan_gate: float = 0.025, gan_ema_decay: float = 0.9, gan_lr: float = 1e-3) -> None:
        super().__init__(seed=seed)
        self.network = network
        self.weight_quant, self.weight_ent = weight_quant, weight_ent
        self.optim = {"name": optimizer, "lr": lr, "weight_decay": weight_decay, "momentum": momentum}
        self.schedule, self.max_steps, self.warmup_steps = schedule, max_steps, warmup_steps
        self.discriminator = discriminator
        self.gate: GANGate | None = None
        if discriminator is not None:
            self.gate = GANGate(threshold=gan_gate, weight=gan_weight, decay=gan_ema_decay)
            self.gan_lr = float(gan_lr)

    def configure_optimizers(self) -> Any:
        if self.discriminator is None:
            params: Any = self.network.parameters()
        else:  # one AdamW, two groups = two AdamWs (per-parameter state); see the module docstring
            params = [{"params": list(self.network.parameters())},
                      {"params": list(self.discriminator.parameters()), "lr": self.gan_lr}]
        opt = make_optimizer(params, **self.optim)
        return stepped_schedule(opt, lambda s: lr_factor(s, schedule=self.schedule, total=self.max_steps),
                                warmup_steps=self.warmup_steps)

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        if self.discriminator is None or gradient_clip_val is None or gradient_clip_algorithm == "value":
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        for group in optimizer.param_groups:  # the generator's and the discriminator's norms, each on its own
            torch.nn.utils.clip_grad_norm_(group["params"], float(gradient_clip_val))

    def losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Every term of one step: ``"loss"`` is the generator's weighted sum L_G. With a discriminator also
        ``"d_loss"`` (its hinge loss × 0.5, gradient to D only), ``"g_adv"`` (−mean D(x̂)) and ``"gan_weight"``
        (the gate's weight, already in ``"loss"``); the gate is read, not updated (:meth:`training_step` does)."""
        x = batch["image"] * 2.0 - 1.0
        da = int(batch["da"])
        x_hat, quant = self.network(x, da)
        l1 = masked_l1(x, x_hat, batch["valid"]).mean()
        lq = quant_prior_loss(quant.probs)
        le = entropy_loss(quant.probs)
        loss = l1 + self.weight_quant * lq + self.weight_ent * le
        if quant.vq_loss is not None:
            loss = loss + quant.vq_loss
        terms = {"loss": loss, "l1": l1, "quant": lq, "entropy": le}
        if self.discriminator is not None:
            terms.update(self._gan_terms(x, x_hat, batch["valid"], da, loss))
        return terms

    def _gan_terms(self, x: torch.Tensor, x_hat: torch.Tensor, valid: torch.Tensor, da: int,
                   loss: torch.Tensor) -> dict[str, torch.Tensor]:
        assert self.discriminator is not None and self.gate is not None
        fake = torch.where(valid, x_hat, x)  # padding: the crop's own voxels, so D judges valid voxels only
        d_fake = self.discriminator(fake.detach(), da)
        d_loss = discriminator_hinge_loss(self.discriminator(x, da), d_fake)
        weight = self.gate.weight
        if weight > 0:
            from torch.func import functional_call

            frozen = {k: p.detach() for k, p in self.discriminator.named_parameters()}
            g_adv = generator_gan_loss(functional_call(self.discriminator, frozen, (fake, da)))
            loss = loss + weight * g_adv
        else:  # the same value, without a graph to the generator
            g_adv = generator_gan_loss(d_fake.detach())
        return {"loss": loss, "d_loss": d_loss, "g_adv": g_adv, "gan_weight": x.new_tensor(weight)}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        terms = self.losses(batch)
        b = batch["image"].shape[0]
        if self.gate is not None:
            self.log("train/gan_gate_open", float(self.gate.is_open), batch_size=b)  # the gate this step used
            d_loss = terms["d_loss"].detach()
            if self._trainer is not None and self.trainer.world_size > 1:
                d_loss = self.trainer.strategy.reduce(d_loss, reduce_op="mean")
            self.gate.update(d_loss)  # gates the next steps
            self.log("train/d_loss_ema", float(self.gate.ema), batch_size=b)  # type: ignore[arg-type]
        for name, value in terms.items():  # train/d_loss: the mean over the processes, the value the gate saw
            logged = d_loss if name == "d_loss" else value.detach()
            self.log(f"train/{name}", logged, prog_bar=name == "loss", batch_size=b)
        return terms["loss"] if self.gate is None else terms["loss"] + terms["d_loss"]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.gate is not None:
            checkpoint[GATE_KEY] = self.gate.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if self.gate is not None:
            if GATE_KEY not in checkpoint:
                raise ValueError("the checkpoint has no GAN gate state: it was written by a run without "
                                 "method.gan; resume it with method.gan: false")
            self.gate.load_state_dict(checkpoint[GATE_KEY])

    def val_metric_names(self) -> Sequence[str]:
        return ["l1", *(f"l1_da{d}" for d in DAS), "code_usage", "perplexity"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        x = batch["image"] * 2.0 - 1.0
        da = int(batch["da"])
        x_hat, quant = self.network(x, da)
        l1 = masked_l1(x, x_hat, batch["valid"]).detach()
        self.add_val_metric("l1", l1)
        self.add_val_metric(f"l1_da{da}", l1)
        # per crop, so that any number of processes gives the same means
        stats = [codebook_usage(p[None]) for p in quant.probs.detach()]
        self.add_val_metric("code_usage", torch.tensor([s.usage for s in stats]))
        self.add_val_metric("perplexity", torch.tensor([s.perplexity for s in stats]))


def gan_kwargs(method: Any, network: nn.Module) -> dict[str, Any]:
    """The :class:`PUMITTokenizerSystem` keyword arguments of a recipe's ``method:`` section (``PUMITMethod``) for
    the tokenizer ``network``: none with ``gan: false``, else a fresh discriminator (``gan_channels``, the
    tokenizer's input channels) and the gate's settings. Raises ``ValueError`` naming the field when the
    discriminator cannot judge the tokenizer's crops."""
    if not method.gan:
        return {}
    from medmodal.networks.pumit_discriminator import PUMITDiscriminator

    ours = int(network.num_downsamplings)  # type: ignore[arg-type]
    if len(method.gan_channels) > ours:
        raise ValueError(f"method.gan_channels {list(method.gan_channels)}: the discriminator downsamples once per "
                         f"width and the tokenizer {ours} times; a crop of whole tokens must be whole discriminator "
                         f"patches, so give at most {ours} widths")
    return {"discriminator": PUMITDiscriminator(in_channels=int(network.in_channels),  # type: ignore[arg-type]
                                                widths=method.gan_channels),
            "gan_weight": method.gan_weight, "gan_gate": method.gan_gate, "gan_ema_decay": method.gan_ema_decay,
            "gan_lr": method.gan_lr}


def mim_targets(tokenizer: nn.Module, x: torch.Tensor, da: int) -> torch.Tensor:
    """The frozen tokenizer's soft tokens of ``x (B, 1, X, Y, Z)`` in [-1, 1]: ``(B, L, K)``, tokens row-major with
    Z fastest (the ViT's order)."""
    with torch.no_grad():
        logits = tokenizer.tokenize(x, da)  # (B, K, gx, gy, gz)
    return logits.movedim(1, -1).flatten(1, -2).softmax(-1)


def mask_layer_ids(num_layers: int, mask_layers: str | int) -> list[int]:
    """The ViT blocks that see the mask tokens: every one (``"all"``, BEiT) or the last ``mask_layers``."""
    return list(range(num_layers)) if mask_layers == "all" else list(range(max(num_layers - int(mask_layers), 0),
                                                                            num_layers))


def crop_generator(seed: int, image_id: str, corner: Sequence[int]) -> torch.Generator:
    """A generator fixed by the crop's identity (validation masks: the same on any number of processes)."""
    import hashlib

    digest = hashlib.sha1(f"{seed}/{image_id}/{tuple(corner)}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


class PUMITMIMSystem(MethodSystem):
    """Pretrain a :class:`~medmodal.networks.pumit_vit.PUMITViT` by masked image modelling (spec §2.4): predict the
    frozen tokenizer's soft tokens at the masked positions (cross-entropy with soft targets).

    Args:
        network: the ViT (``codebook_size`` = the tokenizer's ``K``, ``patch_size`` = its stride).
        tokenizer: the frozen tokenizer (eval mode, no gradient; fed ``2x - 1`` like the ViT).
        mask_ratio: share of the grid tokens masked (0.55); ``⌊L·(1 − ratio)⌋`` stay visible, drawn per crop from
            (seed, step, the crop's image and corner): 2 processes train exactly as 1, a resume continues exactly.
        mask_layer_ids: the blocks that see the mask tokens (all: BEiT-style).
        optimizer, lr, weight_decay, momentum, schedule, max_steps, warmup_steps: optimisation (spec: AdamW 2e-5).
        seed: the masks' seed.
    """

    progress_metrics = ("mim_ce",)

    def __init__(self, *, network: nn.Module, tokenizer: nn.Module, mask_ratio: float, mask_layer_ids: Sequence[int],
                 optimizer: str, lr: float, weight_decay: float, momentum: float, schedule: str, max_steps: int,
                 warmup_steps: int, seed: int = 0) -> None:
        super().__init__(seed=seed)
        self.network = network
        # frozen; put in eval mode before every use (_mim), since Lightning sets every submodule's mode at fit start
        self.tokenizer = tokenizer.train().requires_grad_(False)
        self.mask_ratio, self.mask_layer_ids = mask_ratio, list(mask_layer_ids)
        self.optim = {"name": optimizer, "lr": lr, "weight_decay": weight_decay, "momentum": momentum}
        self.schedule, self.max_steps, self.warmup_steps = schedule, max_steps, warmup_steps

    def configure_optimizers(self) -> Any:
        opt = make_optimizer(self.network.parameters(), **self.optim)
        return stepped_schedule(opt, lambda s: lr_factor(s, schedule=self.schedule, total=self.max_steps),
                                warmup_steps=self.warmup_steps)

    def _mim(self, batch: dict[str, Any], visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from medmodal.losses.pumit import masked_positions

        self.tokenizer.eval()  # Lightning puts every submodule in train mode; the tokenizer stays frozen
        x = batch["image"] * 2.0 - 1.0
        da = int(batch["da"])
        target = mim_targets(self.tokenizer, x, da)
        logits = self.network.forward_mim(x, da, visible, self.mask_layer_ids)
        return logits, target, masked_positions(visible, target.shape[1])

    def masks(self, batch: dict[str, Any], *, step: int) -> torch.Tensor:
        """``(B, ⌊L·(1 − ratio)⌋)`` visible token indices, each crop's drawn from (seed, step, its image and corner):
        the same on any number of processes and after a resume (``step`` 0: the fixed validation masks)."""
        from medmodal.losses.pumit import random_visible

        n = self.num_tokens(batch)
        return torch.cat([random_visible(n, mask_ratio=self.mask_ratio,
                                         generator=crop_generator(self.seed * 1_000_003 + step, i, c))
                          for i, c in zip(batch["image_id"], batch["corner"], strict=True)])

    def num_tokens(self, batch: dict[str, Any]) -> int:
        g = batch["tokens"]
        return int(g[0] * g[1] * g[2])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        from medmodal.losses.pumit import soft_target_cross_entropy, soft_target_kl

        b = batch["image"].shape[0]
        visible = self.masks(batch, step=int(self.global_step) + 1)
        logits, target, masked = self._mim(batch, visible)
        loss = soft_target_cross_entropy(logits, target, masked)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=b)
        self.log("train/kl", soft_target_kl(logits.detach(), target, masked), batch_size=b)
        return loss

    def val_metric_names(self) -> Sequence[str]:
        return ["mim_ce", "mim_kl", "token_accuracy"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        from medmodal.losses.pumit import soft_target_cross_entropy, soft_target_kl

        visible = self.masks(batch, step=0)
        logits, target, masked = self._mim(batch, visible)
        for k in range(logits.shape[0]):  # per crop: any number of processes gives the same means
            m = masked[k:k + 1]
            self.add_val_metric("mim_ce", soft_target_cross_entropy(logits[k:k + 1], target[k:k + 1], m).detach())
            self.add_val_metric("mim_kl", soft_target_kl(logits[k:k + 1], target[k:k + 1], m).detach())
            hit = (logits[k].argmax(-1) == target[k].argmax(-1))[m[0]].float().mean()
            self.add_val_metric("token_accuracy", hit.detach())
