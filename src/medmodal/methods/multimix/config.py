"""The ``method:`` section of a MultiMix recipe (``shared/methods/multimix.md`` §2.5: every paper-versus-code
switch, with medmodal's default, plus the label budgets and the baselines of the paper's table)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from medmodal.engine.plugin import MethodSection

#: The models of the paper's table (spec §4) → ``(classify, segment, semi_supervised, saliency_bridge)``.
#: ``multimix`` is UMTL-SSL-S; ``semi_supervised`` means FixMatch for classification and the KL term for
#: segmentation (each where its task is trained).
VARIANTS: dict[str, tuple[bool, bool, bool, bool]] = {
    "multimix": (True, True, True, True),
    "umtl": (True, True, False, False),
    "umtl_s": (True, True, False, True),
    "umtl_ssl": (True, True, True, False),
    "unet": (False, True, False, False),
    "enc": (True, False, False, False),
    "enc_ssl": (True, False, True, False),
}

#: What each variant is called in the paper's table.
VARIANT_TITLES: dict[str, str] = {
    "multimix": "MultiMix (UMTL-SSL-S)", "umtl": "UMTL", "umtl_s": "UMTL-S", "umtl_ssl": "UMTL-SSL",
    "unet": "U-Net (segmentation only)", "enc": "Enc (classification only)", "enc_ssl": "EncSSL (FixMatch)",
}

Budget = int | Literal["all"]


class MultiMixMethod(MethodSection):
    """MultiMix (Haque et al., ISBI 2021; MELBA 2021): one encoder-decoder learns classification (supervised +
    FixMatch) and segmentation (Dice + a KL consistency term) together, with a saliency bridge between them.

    Images are resized to ``image_size`` (their own axis order, no resampling to a spacing); the model's
    intensity space is [-1, 1] (per image and modality, percentiles ``percentiles`` → [0, 1] → ×2 − 1).
    ``data.batch_size`` is the global batch of *each* of the five streams (spec §2.4: 10).
    """

    name: Literal["multimix"] = "multimix"
    variant: Literal["multimix", "umtl", "umtl_s", "umtl_ssl", "unet", "enc", "enc_ssl"] = "multimix"
    image_size: list[int] = [64, 64]
    percentiles: tuple[float, float] = (0.5, 99.5)
    # segmentation target: these regions of the data (None: every region it declares), one sigmoid channel each
    regions: list[str] | None = None
    # label budgets (spec §4): how many training images keep their mask / class label; "all": every one
    seg_labels: Budget = "all"
    cls_labels: Budget = "all"
    # splits: sources held out of training entirely (cross-source test), and the in-source test share; the
    # validation share (model selection) is data.val_fraction
    cross_sources: list[str] = []
    test_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    # losses (spec §2.2 code defaults): L = cls + 5 dice + 0.25 fixmatch + 0.01 kl
    weight_cls: float = Field(1.0, ge=0.0)
    weight_dice: float = Field(5.0, ge=0.0)
    weight_fixmatch: float = Field(0.25, ge=0.0)
    weight_kl: float = Field(0.01, ge=0.0)
    tau: float = Field(0.7, gt=0.0, le=1.0)
    fixmatch_norm: Literal["batch", "confident"] = "batch"
    seg_kl: Literal["bernoulli", "faithful_zero", "none"] = "bernoulli"
    # restore: the caller's train/eval mode after the saliency pass; train: the released code (dropout stays on)
    eval_mode_after_saliency: Literal["restore", "train"] = "restore"
    # autograd_grad: the input's gradient only; backward: the released extra backward() + zero_grad() (discards
    # accumulated parameter gradients and fires DDP's hooks: single process only)
    saliency_impl: Literal["autograd_grad", "backward"] = "autograd_grad"
    # validation: best validation Dice + accuracy; first: the first validation's weights (the released code's
    # epoch-0 bug); last: the final weights
    model_selection: Literal["validation", "first", "last"] = "validation"
    # unified: every stream in [-1, 1]; faithful: the released code's mix (classification streams and test
    # inputs in [0, 1], segmentation training streams in [-1, 1])
    input_scaling: Literal["unified", "faithful"] = "unified"
    # reshuffle the streams every epoch (weak/strong stay paired); False: the released loaders' fixed order
    reshuffle_streams: bool = True
    # augmentation of the segmentation streams: none (the released code) or the weak view (image and mask)
    seg_augment: Literal["none", "weak"] = "none"
    # learning-rate decay (spec §2.4): step (StepLR, x gamma every lr_step_epochs epochs; an epoch is one pass
    # over the unlabelled classification images), cosine (to zero over train.max_steps) or none
    lr_decay: Literal["step", "cosine", "none"] = "step"
    lr_step_epochs: float = Field(8.0, gt=0.0)
    lr_gamma: float = Field(0.1, gt=0.0, le=1.0)

    @field_validator("image_size")
    @classmethod
    def _sizes(cls, v: list[int]) -> list[int]:
        if len(v) not in (2, 3) or any(s < 8 for s in v):
            raise ValueError(f"image_size must be 2 or 3 sizes of at least 8 pixels, got {v}")
        return v

    @field_validator("seg_labels", "cls_labels", mode="before")
    @classmethod
    def _budget(cls, v: object) -> object:
        if v == "all" or (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
            return v
        raise ValueError(f"a number of labelled images (>= 0) or 'all', got {v!r}")

    @model_validator(mode="after")
    def _percentiles(self) -> MultiMixMethod:
        lo, hi = self.percentiles
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError(f"percentiles must be [low, high], 0 <= low < high <= 100, got {list(self.percentiles)}")
        return self

    @property
    def tasks(self) -> tuple[bool, bool, bool, bool]:
        """``(classify, segment, semi_supervised, saliency_bridge)`` of :attr:`variant`."""
        return VARIANTS[self.variant]
