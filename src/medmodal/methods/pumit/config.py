"""The ``method:`` section of a PUMIT recipe (``shared/methods/pumit.md`` §2.3, §2.6). Only the tokenizer stage is
trained so far; the masked-image-modelling stage and fine-tuning follow (issue 14)."""

from __future__ import annotations

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
    stage: Literal["tokenizer"] = "tokenizer"
    quantizer: Literal["soft", "nearest", "gumbel"] = "soft"
    # prior regularisers (spec §2.6 `prior_weights`): the README command's (0.03, 1.0); the YAML's were (1.0, 0.2)
    weight_quant: float = Field(0.03, ge=0.0)
    weight_ent: float = Field(1.0, ge=0.0)
    # the largest crop in tokens (x, y, z); fewer where an image is smaller (spec: 8x8x4 for the tokenizer)
    token_grid: list[int] = [8, 8, 4]
    percentiles: tuple[float, float] = (0.5, 99.5)
    # validation: this many global batches of crops of the validation images (a fixed draw)
    val_batches: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _checks(self) -> PUMITMethod:
        if len(self.token_grid) != 3 or min(self.token_grid) < 1:
            raise ValueError(f"token_grid must be 3 positive token counts (x, y, z), got {self.token_grid}")
        lo, hi = self.percentiles
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError(f"percentiles must be [low, high], 0 <= low < high <= 100, got {list(self.percentiles)}")
        return self
