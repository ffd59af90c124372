"""The ``method:`` section of a PUMIT recipe (``shared/methods/pumit.md`` §2.3, §2.4, §2.6): the tokenizer stage and
the masked-image-modelling (MIM) stage of the ViT against a frozen tokenizer run."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from medmodal.engine.plugin import MethodSection


class PUMITMethod(MethodSection):
    """PUMIT (Luo et al., arXiv 2312.07630): a spatially adaptive tokenizer pretrained on unlabelled 2D and 3D images
    of any spacing together.

    Every image of the recipe's data set (each modality of each case) is one image of the collection: mapped to
    [0, 1] by its percentiles, cropped to whole tokens (no resampling) and batched by degree of anisotropy and token
    grid (``medmodal.data.collections``). The tokenizer sees ``2x - 1``.
    """

    name: Literal["pumit"] = "pumit"
    # tokenizer: train the tokenizer (model pumit_tokenizer); mim: pretrain the ViT (model pumit_vit) to predict the
    # frozen tokenizer run's soft tokens at masked positions
    stage: Literal["tokenizer", "mim"] = "tokenizer"
    tokenizer_run: Path | None = None  # mim: the tokenizer run folder
    mask_ratio: float = Field(0.55, gt=0.0, lt=1.0)  # mim: share of tokens masked (spec: 0.55)
    # mim: the layers that see the mask tokens: all (BEiT, the spec's ViT-B) or the last N (MAE-like, ViT-L: 6)
    mask_layers: Literal["all"] | int = "all"
    quantizer: Literal["soft", "nearest", "gumbel"] = "soft"
    # prior regularisers (spec §2.6 `prior_weights`): the README command's (0.03, 1.0); the YAML's were (1.0, 0.2)
    weight_quant: float = Field(0.03, ge=0.0)
    weight_ent: float = Field(1.0, ge=0.0)
    # the largest crop in tokens (x, y, z); fewer where an image is smaller (spec: 8x8x4 for the tokenizer)
    token_grid: list[int] = [8, 8, 4]
    percentiles: tuple[float, float] = (0.5, 99.5)
    # the images: None = every modality of every case of `data`; a folder of images (any mix of 2D/3D, formats and
    # spacings; a sub-folder name is the modality tag) or a collection manifest (CSV/JSON: path, modality, spacing)
    collection: Path | None = None
    # image channels the networks see: 1 (colour -> grey by ITU-R BT.601) or 3 (the spec: RGB, grey replicated)
    channels: Literal[1, 3] = 1
    # validation: this many global batches of crops of the validation images (a fixed draw)
    val_batches: int = Field(4, ge=1)
    # -- tokenizer stage: the adversarial term (spec §2.3, switch `gan` of §2.6: off for tiny runs, on in the full
    # recipe). A SAC patch discriminator (widths gan_channels) trained with the hinge loss x 0.5 at lr gan_lr (the
    # recipe's optimizer, weight decay and schedule); the generator adds gan_weight * (-mean D(x_hat)) while
    # max(EMA_gan_ema_decay(disc loss), disc loss) <= gan_gate (invariant 10)
    gan: bool = False
    gan_weight: float = Field(3e-3, ge=0.0)  # w_g (the official YAML, adaptive weighting off)
    gan_gate: float = Field(0.025, gt=0.0)  # use_gan_th (the official YAML; the script default is 0.03)
    gan_ema_decay: float = Field(0.9, ge=0.0, lt=1.0)
    gan_lr: float = Field(1e-3, gt=0.0)  # the discriminator's learning rate (spec: 1e-3 against the generator's 1e-4)
    gan_channels: list[int] = [128, 256, 512]  # the discriminator's widths, one stride-2 SAC downsampling each
    # LPIPS (spec switch `perceptual`): only `none`; `lpips_vgg` needs VGG weights downloaded from the internet
    perceptual: Literal["none", "lpips_vgg"] = "none"

    @model_validator(mode="after")
    def _checks(self) -> PUMITMethod:
        if len(self.token_grid) != 3 or min(self.token_grid) < 1:
            raise ValueError(f"token_grid must be 3 positive token counts (x, y, z), got {self.token_grid}")
        if self.stage == "mim" and self.tokenizer_run is None:
            raise ValueError("tokenizer_run: the mim stage needs the folder of a trained tokenizer run "
                             "(method.stage: tokenizer)")
        if isinstance(self.mask_layers, int) and self.mask_layers < 1:
            raise ValueError(f"mask_layers must be 'all' or a positive number of layers, got {self.mask_layers}")
        if self.perceptual != "none":
            raise ValueError(f"perceptual: {self.perceptual!r} is not available: LPIPS compares VGG features whose "
                             "pretrained weights are a download, and medmodal downloads no weights (spec §2.6: "
                             "perceptual none offline); use perceptual: none")
        if self.gan and self.stage != "tokenizer":
            raise ValueError("gan: the adversarial term belongs to the tokenizer stage (method.stage: tokenizer); "
                             "set gan: false for the mim stage")
        if not self.gan_channels or any(c < 1 or c % 8 for c in self.gan_channels):
            raise ValueError(f"gan_channels must be positive multiples of 8 (GroupNorm of 8 groups), got "
                             f"{self.gan_channels}")
        lo, hi = self.percentiles
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError(f"percentiles must be [low, high], 0 <= low < high <= 100, got {list(self.percentiles)}")
        return self
