"""Evaluate a model under every non-empty subset of modalities (15 for BraTS), per case and region."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from rich.progress import Progress
from torch import nn

from medmodal.evaluation.inference import Blend, nonempty_subsets, predict_subsets, subset_masks
from medmodal.evaluation.metrics import region_metrics
from medmodal.transforms import labels_to_regions

log = logging.getLogger("medmodal")


@dataclass(frozen=True)
class SubsetResult:
    """One row of the all-subset table: a case, a modality subset, a region and its metrics."""

    model: str
    case_id: str
    subset: str
    n_modalities: int
    region: str
    dice: float
    hd95: float


def subset_name(subset: Sequence[str]) -> str:
    """``("t1", "flair")`` → ``"t1+flair"``."""
    return "+".join(subset)


def evaluate_subsets(
    network: nn.Module,
    cases: Sequence,
    *,
    modalities: Sequence[str],
    regions: dict[str, tuple[int, ...]],
    roi_size: Sequence[int],
    overlap: float = 1 / 3,
    blend: Blend = "mean_prob",
    sw_batch_size: int | Literal["auto"] = "auto",
    channels_last: bool = False,
    subsets: Sequence[Sequence[str]] | None = None,
    model_name: str = "model",
    progress: bool = True,
    postprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[SubsetResult]:
    """Dice and HD95 of ``network`` on labelled cached ``cases`` under every modality subset.

    A subset is evaluated on a case only if the case has all of its modalities (a case missing FLAIR cannot
    tell how the model does with FLAIR). Each case is swept once by sliding windows with all its subsets
    batched together (:func:`~medmodal.evaluation.inference.predict_subsets`); a region is predicted where its
    blended sigmoid probability exceeds 0.5.

    Args:
        network: ``forward(image (B, M, *S), available (B, M)) -> logits (B, R, *S)``.
        cases: :class:`~medmodal.data.cache.CachedCase` objects with labels.
        modalities: the ``M`` channel names; regions: region name → label values.
        roi_size, overlap, blend, sw_batch_size, channels_last: sliding-window settings (see
            :func:`~medmodal.evaluation.inference.predict_subsets`).
        subsets: which subsets to evaluate (default: all ``2**M - 1``).
        postprocess: maps the ``(K, R, *S)`` bool predictions before scoring (e.g. ShaSpec*'s small-ET rule,
            :func:`~medmodal.transforms.drop_small_region`); none if None.
    """
    subsets = [tuple(s) for s in subsets] if subsets is not None else nonempty_subsets(modalities)
    all_masks = subset_masks(modalities, subsets)
    network.eval()
    rows: list[SubsetResult] = []
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"evaluating {model_name} on {len(subsets)} subsets", total=len(cases))
        for case in cases:
            label = case.label()
            if label is None:
                log.info("case %s has no label; skipped in evaluation", case.case_id)
                bar.advance(task)
                continue
            have = torch.as_tensor(np.asarray(case.available), dtype=torch.bool)
            ok = [k for k in range(len(subsets)) if bool((all_masks[k] <= have).all())]
            if not ok:
                bar.advance(task)
                continue
            image = torch.from_numpy(np.array(case.image(), dtype=np.float32))[None]
            logits = predict_subsets(network, image, all_masks[ok], roi_size=roi_size, overlap=overlap, blend=blend,
                                     activation="sigmoid", sw_batch_size=sw_batch_size, channels_last=channels_last)
            pred = logits.sigmoid() > 0.5
            if postprocess is not None:
                pred = postprocess(pred)
            target = labels_to_regions(torch.from_numpy(np.array(label, dtype=np.int64))[None, None], regions)
            dice, hd = region_metrics(pred, target, spacing=case.geometry.spacing)
            for row, k in enumerate(ok):
                for r, region in enumerate(regions):
                    rows.append(SubsetResult(
                        model=model_name, case_id=case.case_id, subset=subset_name(subsets[k]),
                        n_modalities=len(subsets[k]), region=region,
                        dice=float(dice[row, r]), hd95=float(hd[row, r]),
                    ))
            bar.advance(task)
    return rows
