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

    @model_validator(mode="after")
    def _checks(self) -> PUMITMethod:
        if len(self.token_grid) != 3 or min(self.token_grid) < 1:
            raise ValueError(f"token_grid must be 3 positive token counts (x, y, z), got {self.token_grid}")
        if self.stage == "mim" and self.tokenizer_run is None:
            raise ValueError("tokenizer_run: the mim stage needs the folder of a trained tokenizer run "
                             "(method.stage: tokenizer)")
        if isinstance(self.mask_layers, int) and self.mask_layers < 1:
            raise ValueError(f"mask_layers must be 'all' or a positive number of layers, got {self.mask_layers}")
        lo, hi = self.percentiles
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError(f"percentiles must be [low, high], 0 <= low < high <= 100, got {list(self.percentiles)}")
        return self
