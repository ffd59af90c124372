"""The ``method:`` section of a MedCoSS recipe (``shared/methods/medcoss.md`` §2, §2.7 switches).

A MedCoSS model is pretrained one modality at a time: ``method.stages`` lists them in order, and one run trains one
stage (``method.stage``, 1-based) starting from the run of the stage before (``method.previous_run``: its encoder
is the student's starting point, its frozen copy the teacher, its rehearsal buffers the old modalities' data).
``medmodal pretrain`` runs the stages one after the other, or adds a stage to a finished model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from medmodal.engine.plugin import MethodSection
from medmodal.engine.recipe import PhantomConfig

Kind = Literal["text", "image2d", "image3d"]
#: a stage name that says its kind (``medmodal pretrain --stage NAME`` without a kind)
KIND_OF_NAME: dict[str, str] = {"report": "text", "text": "text", "reports": "text", "xray": "image2d",
                                "x-ray": "image2d", "cxr": "image2d", "pathology": "image2d", "fundus": "image2d",
                                "ct": "image3d", "mri": "image3d", "mr": "image3d"}


class StageData(BaseModel):
    """Where one stage's data comes from.

    * ``collection``: a folder of images or a collection manifest (image stages; any formats and spacings);
    * otherwise a data set of cases: ``path`` (any layout medmodal reads) or the built-in ``phantom``; a text stage
      reads each case's report, an image stage takes every ``modalities`` image of every case.
    """

    model_config = ConfigDict(extra="forbid")

    collection: Path | None = None
    path: Path | None = None
    phantom: PhantomConfig = PhantomConfig()
    modalities: list[str] | None = None
    cache_dir: Path | None = None

    @model_validator(mode="after")
    def _one_source(self) -> StageData:
        if self.collection is not None and self.path is not None:
            raise ValueError("give a stage's images as collection (a folder or manifest of images) or its cases as "
                             "path, not both")
        return self


class StageConfig(BaseModel):
    """One stage: a modality name (its buffer and probes are named after it), its kind and its data."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    kind: Kind
    data: StageData = StageData()

    @model_validator(mode="after")
    def _name(self) -> StageConfig:
        if not self.name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"stage name {self.name!r}: use letters, digits, '-' and '_' (it names files)")
        return self


class MedCoSSMethod(MethodSection):
    """MedCoSS (Ye et al., CVPR 2024): continual self-supervised pretraining, one modality per stage, with a
    k-means rehearsal buffer, intra-modal mixup and feature distillation against the previous stage's encoder."""

    name: Literal["medcoss"] = "medcoss"
    stages: list[StageConfig] = Field(min_length=1)
    stage: int = Field(1, ge=1)  # the stage this run trains (1-based)
    previous_run: Path | None = None  # the run of stage - 1 (required from stage 2 on)
    # medcoss: rehearsal buffers + distillation; sequential: the same stages without them (forgets); joint: one run
    # on every stage's data at once (each batch one modality, its own pretext task)
    strategy: Literal["medcoss", "sequential", "joint"] = "medcoss"
    buffer_selection: Literal["kmeans", "random"] = "kmeans"  # random: the same number of items, drawn uniformly
    buffer_ratio: float = Field(0.05, gt=0.0, le=1.0)  # 5 % of a stage's data
    cluster_ratio: float = Field(0.01, gt=0.0, le=1.0)  # k = 1 % of it
    buffer_backend: Literal["sklearn", "minibatch", "faiss", "auto"] = "sklearn"
    mixup: bool = True  # intra-modal mixup of buffer batches (spec §2.4)
    teacher_mode: Literal["eval", "train"] = "eval"  # train: the released code's stochastic teacher (drop-path on)
    mask_ratio: float = Field(0.75, gt=0.0, lt=1.0)  # MAE
    norm_pix: bool = True  # MAE targets normalised per patch
    mlm_probability: float = Field(0.15, gt=0.0, lt=1.0)
    text_pooling: Literal["mask_aware", "all"] = "mask_aware"  # buffer features of texts (all: the released code)
    text_max_length: int = Field(112, ge=4)
    text_vocab_size: int = Field(30000, ge=16)  # the BPE tokenizer trained on the first text stage's reports
    text_min_frequency: int = Field(2, ge=1)
    input_size_2d: list[int] = [224, 224]
    input_size_3d: list[int] = [192, 192, 16]  # slice axis last (the spec's 16 x 192 x 192)
    decoder_width: int = Field(512, ge=8)
    decoder_depth: int = Field(8, ge=1)
    decoder_heads: int = Field(16, ge=1)
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)  # of each stage's data, for the validation losses and probes
    val_batches: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _checks(self) -> MedCoSSMethod:
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stages: each modality name once, got {names}")
        if self.stage > len(self.stages):
            raise ValueError(f"stage {self.stage}: the recipe lists {len(self.stages)} stage(s)")
        if self.strategy == "joint" and self.stage != 1:
            raise ValueError("strategy joint trains every stage's data in one run: stage must be 1")
        if self.stage > 1 and self.strategy != "joint" and self.previous_run is None:
            raise ValueError(f"previous_run: stage {self.stage} continues from the run of stage {self.stage - 1}; "
                             "give its folder (medmodal pretrain does this for you)")
        if len(self.input_size_2d) != 2 or len(self.input_size_3d) != 3:
            raise ValueError("input_size_2d needs 2 sizes and input_size_3d 3 (slice axis last)")
        return self

    @property
    def current(self) -> StageConfig:
        """The stage this run trains."""
        return self.stages[self.stage - 1]
