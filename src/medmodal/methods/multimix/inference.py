"""Applying a trained MultiMix network to whole cases: the model's grid in, the input's grid out.

Shared by ``medmodal evaluate`` and ``medmodal predict``. A case is resized onto the model's grid like the
training images (:func:`~medmodal.methods.multimix.data.model_input`), the network runs in eval mode on batches of
cases, and the segmentation probabilities and the saliency map are resized back (bilinear / trilinear) to the
case's own array shape, so a mask lands on the input's grid and is thresholded there at 0.5.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from medmodal.data.case import Case
from medmodal.engine.runinfo import LoadedRun
from medmodal.methods.multimix.data import ModelInput, model_input, resize
from medmodal.methods.multimix.system import memory_format, multitask_outputs, to_unit


@dataclass
class CasePrediction:
    """What the network says about one case.

    Attributes:
        seg_prob: ``(R, *shape)`` float32 region probabilities on the case's grid, or ``None`` (no segmentation).
        class_prob: ``(K,)`` float32 class probabilities, or ``None`` (no classification).
        saliency: ``(*shape)`` float32 on the case's grid: |∂ max-class logit / ∂ input| summed over the
            available modalities, or ``None`` (no classification head).
        image: ``(M, *image_size)`` the model's input (for figures); saliency_model: ``(*image_size)`` or None.
    """

    seg_prob: np.ndarray | None
    class_prob: np.ndarray | None
    saliency: np.ndarray | None
    image: np.ndarray
    saliency_model: np.ndarray | None


def case_input(case: Case, run: LoadedRun) -> ModelInput:
    """``case`` on ``run``'s model grid (its modalities, regions, image size and percentiles)."""
    inf = run.info.inference
    regions = {k: tuple(v) for k, v in run.info.task.regions.items()}
    return model_input(case, modalities=run.info.modalities, regions=regions, image_size=inf["image_size"],
                       percentiles=inf["percentiles"])


def predict_inputs(network: nn.Module, inputs: Sequence[ModelInput], *, inference: dict[str, Any],
                   batch_size: int | None = None) -> list[CasePrediction]:
    """Run ``network`` (eval mode) over ``inputs`` in batches; see :class:`CasePrediction`."""
    faithful = inference.get("input_scaling") == "faithful"
    batch_size = int(batch_size or inference.get("batch_size", 16))
    network.eval()
    out: list[CasePrediction] = []
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start:start + batch_size]
        x = torch.stack([c.image for c in chunk])
        x = memory_format(to_unit(x) if faithful else x, bool(inference.get("channels_last", False)))
        avail = torch.stack([c.available for c in chunk])
        with torch.no_grad():
            res = multitask_outputs(network, x, avail)
            sal = res.saliency
            if sal is None and res.class_logits is not None:
                with torch.inference_mode(False):
                    sal = network.saliency(x.clone(), avail.clone())
        seg = None if res.seg_logits is None else res.seg_logits.detach().float().sigmoid()
        prob = None if res.class_logits is None else res.class_logits.detach().float().softmax(1)
        for i, case in enumerate(chunk):
            s_model = None
            s_case = None
            if sal is not None:
                s_model = sal[i].detach().float().sum(0)  # the network zeroes missing modalities' saliency
                s_case = resize(s_model[None], case.shape)[0].clamp_min(0).numpy()
                s_model = s_model.numpy()
            out.append(CasePrediction(
                seg_prob=None if seg is None else resize(seg[i], case.shape).clamp(0, 1).numpy(),
                class_prob=None if prob is None else prob[i].numpy(),
                saliency=s_case, image=case.image.numpy(), saliency_model=s_model))
    return out
