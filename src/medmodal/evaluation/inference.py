"""Sliding-window inference of one case under one or many modality subsets (MONAI's ``sliding_window_inference``).

Windows are blended in one of two ways (``blend``):

* ``"mean_prob"``: the plain mean of the windows' probabilities (sigmoid per region channel, softmax over the
  channels of a label task), thresholded at 0.5 / argmax: the released inference of the first method that
  defined one (window = training crop, overlap 1/3, mean of sigmoid probabilities; see that method's docs).
* ``"gaussian_logits"``: a Gaussian-weighted mean of the windows' logits (nnU-Net's importance map, MONAI
  ``mode="gaussian"``), thresholded at logit 0 / argmax.

Either way :func:`predict_subsets` returns **logits**: under ``"mean_prob"`` they are the logits of the averaged
probabilities (``sigmoid(out)`` / ``softmax(out)`` gives them back), so every consumer decodes the same way
(``out.sigmoid() > 0.5`` for regions, ``out.argmax(1)`` for labels) whichever rule blended them.

Speed on the CPU: a 3D convolution on a batch of one falls back to a slow kernel, so windows *and* subsets are
batched into each network call under ``torch.inference_mode``, a few samples a call rather than one or
all: :func:`auto_window_batch` takes the fewest equal batches of windows under a voxel budget
(:data:`MAX_BATCH_VOXELS`), and the subsets of a window are split the same way when they exceed it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from itertools import combinations
from typing import Any, Literal

import torch
from monai.data.utils import dense_patch_slices
from monai.inferers import sliding_window_inference
from torch import nn

Blend = Literal["mean_prob", "gaussian_logits"]
Activation = Literal["sigmoid", "softmax"]
BLENDS: tuple[str, ...] = ("mean_prob", "gaussian_logits")
#: The most ``samples x window voxels`` of one network call, per device type (the memory guard and the speed
#: knob). On the CPU 2**18 = 8 samples of 32³ (the 15 subsets of a window in calls of 8 + 7; every window of
#: a case in calls of about 8 under one subset). Measured on the quickstart case (32×64×64, 9 windows, 15
#: subsets, 2 threads, benchmarks/evaluation.py): 2**18 was the fastest, 2**16 and 2**19 slower (ShaSpec 2.6
#: and 2.8 s vs 2.0 s; larger calls leave the caches, 135 samples at once took 4.0 s), and one sample a call
#: is slowest (3D convolutions of batch 1 fall back to a slow kernel: 0.50 vs 0.10 s for one subset). A GPU
#: wants large calls (ShaSpec, 15 subsets of 9 windows on an H100: 60 ms at 2**19, 11 ms at 2**24).
MAX_BATCH_VOXELS = {"cpu": 2**18, "cuda": 2**24}


def default_batch_voxels(device: torch.device | str) -> int:
    """:data:`MAX_BATCH_VOXELS` of ``device``'s type (the CPU's for any other)."""
    return MAX_BATCH_VOXELS.get(torch.device(device).type, MAX_BATCH_VOXELS["cpu"])


def nonempty_subsets(modalities: Sequence[str]) -> list[tuple[str, ...]]:
    """All ``2**M - 1`` non-empty subsets, ordered by size then by modality order (15 for BraTS)."""
    mods = tuple(modalities)
    return [c for k in range(1, len(mods) + 1) for c in combinations(mods, k)]


def subset_masks(modalities: Sequence[str], subsets: Sequence[Sequence[str]]) -> torch.Tensor:
    """``(K, M) bool``: row k is True for the modalities of ``subsets[k]``."""
    mods = list(modalities)
    unknown = sorted({s for sub in subsets for s in sub} - set(mods))
    if unknown:
        raise ValueError(f"unknown modality name(s) {unknown}; expected some of {mods}")
    return torch.tensor([[m in sub for m in mods] for sub in subsets], dtype=torch.bool)


def window_count(image_size: Sequence[int], roi_size: Sequence[int], overlap: float) -> int:
    """How many windows ``sliding_window_inference`` visits on an image of ``image_size`` (smaller axes are
    padded up to the window). Along an axis of size ``s > r`` windows start every ``int(r * (1 - overlap))``
    voxels, the last one moved back to end at ``s``."""
    size = [max(int(s), int(r)) for s, r in zip(image_size, roi_size, strict=True)]
    roi = [int(r) for r in roi_size]
    interval = [r if r == s else max(int(r * (1 - overlap)), 1) for s, r in zip(size, roi, strict=True)]
    return len(dense_patch_slices(size, roi, interval))


def auto_window_batch(image_size: Sequence[int], roi_size: Sequence[int], overlap: float, n_subsets: int, *,
                      max_voxels: int = MAX_BATCH_VOXELS["cpu"]) -> int:
    """Windows per network call: all the case's windows when ``windows x n_subsets x window voxels`` stays
    under ``max_voxels``, else the fewest equal batches that do (at least one window a call; the subsets are
    then split, see :func:`predict_subsets`)."""
    per_window = max(1, n_subsets) * math.prod(int(r) for r in roi_size)
    return _even_split(window_count(image_size, roi_size, overlap), max_voxels // per_window)


def _even_split(total: int, cap: int) -> int:
    """The size of the fewest equal parts of ``total`` items of at most ``max(cap, 1)`` each (9, 8 → 5)."""
    parts = math.ceil(total / max(1, cap))
    return max(1, math.ceil(total / parts))


def recorded_settings(inference: Mapping[str, Any], *, task_kind: str) -> dict[str, Any]:
    """:func:`predict_subsets` keyword arguments from a run's recorded inference settings (``run.json``).

    ``task_kind`` ``"labels"`` blends softmax probabilities, ``"regions"`` sigmoid ones. A run recorded before
    ``blend`` existed blended Gaussian-weighted logits, and keeps doing so; one recorded before
    ``channels_last`` gets contiguous windows.
    """
    return {"roi_size": list(inference["roi_size"]), "overlap": float(inference["overlap"]),
            "sw_batch_size": inference.get("sw_batch_size", "auto"),
            "blend": inference.get("blend", "gaussian_logits"),
            "channels_last": bool(inference.get("channels_last", False)),
            "activation": "softmax" if task_kind == "labels" else "sigmoid"}


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.ndim)
    return x if fmt is None else x.contiguous(memory_format=fmt)


def _probabilities_to_logits(prob: torch.Tensor, activation: Activation) -> torch.Tensor:
    """Logits whose sigmoid (per channel) or softmax (over the channels) is ``prob``; clamped so they stay
    finite (``|logit| <= 16.6`` at a saturated float32 sigmoid)."""
    info = torch.finfo(prob.dtype)
    if activation == "sigmoid":
        return torch.logit(prob.clamp(info.tiny, 1.0 - info.eps / 2))
    return prob.clamp_min(info.tiny).log()


def predict_subsets(
    network: nn.Module,
    image: torch.Tensor,
    masks: torch.Tensor,
    *,
    roi_size: Sequence[int],
    overlap: float = 1 / 3,
    blend: Blend = "mean_prob",
    activation: Activation = "sigmoid",
    sw_batch_size: int | Literal["auto"] = "auto",
    one_pass: bool = True,
    channels_last: bool = False,
    max_batch_voxels: int | None = None,
) -> torch.Tensor:
    """Logits of one case under each of ``K`` availability masks, in a single sliding-window sweep.

    Each batch of windows is read once and run through the network for every mask as one batch of
    ``n * K`` inputs (split into several calls of at most ``max_batch_voxels`` sample-voxels when that is too
    large), so the cost is one sweep with a ``K`` times larger batch, never batch 1 on the CPU.

    Networks that encode each modality separately (ShaSpec: ``encode`` + ``decode_subsets``) go further when
    ``one_pass``: each window's modalities are encoded once, then fused and decoded under all ``K`` masks.
    This gives the same logits as a forward per mask, because a modality's features do not depend on which
    other modalities are present; ``one_pass=False`` runs that forward per mask (for comparison).

    Args:
        network: ``forward(image (B, M, *S), available (B, M)) -> (B, R, *S)``; optionally ``encode(image,
            available)`` and ``decode_subsets(features, masks (K, M))`` returning ``.logits (B * K, R, *S)``.
        image: ``(1, M, *S)`` one case.
        masks: ``(K, M) bool`` availability masks (each a subset of what the case has).
        roi_size: window size (the training patch size); smaller images are padded.
        overlap: window overlap fraction (ShaSpec spec: 1/3).
        blend: ``"mean_prob"`` (mean of the windows' probabilities) or ``"gaussian_logits"`` (Gaussian-weighted
            mean of their logits); see the module docstring.
        activation: how ``"mean_prob"`` turns logits into probabilities: ``"sigmoid"`` per channel (region
            tasks) or ``"softmax"`` over the ``R`` channels (label tasks). Unused by ``"gaussian_logits"``.
        sw_batch_size: windows per sweep step, or ``"auto"`` (:func:`auto_window_batch`).
        one_pass: encode once and decode every mask when the network can (see above).
        channels_last: feed the network channels-last windows (``channels_last_3d`` in 3D), as the training
            of ``train.channels_last`` does: the quickstart U-Net's evaluation took 20 % less time on the CPU.
            Same results up to float rounding.
        max_batch_voxels: the most ``samples x window voxels`` of one network call (the memory guard); None:
            :func:`default_batch_voxels` of the image's device.

    Returns:
        ``(K, R, *S)`` logits (a plain tensor, not an inference-mode one).
    """
    if image.ndim < 4 or image.shape[0] != 1:
        raise ValueError(f"image must be (1, M, *S), got {tuple(image.shape)}")
    k, m = masks.shape
    if m != image.shape[1]:
        raise ValueError(f"masks have {m} modalities but the image has {image.shape[1]} channels")
    if not bool(masks.any(dim=1).all()):
        raise ValueError("every availability mask needs at least one modality")
    if blend not in BLENDS:
        raise ValueError(f"blend must be one of {list(BLENDS)}, got {blend!r}")
    if activation not in ("sigmoid", "softmax"):
        raise ValueError(f"activation must be 'sigmoid' or 'softmax', got {activation!r}")
    spatial = image.ndim - 2
    if len(roi_size) != spatial:
        raise ValueError(f"roi_size {tuple(roi_size)} does not match a {spatial}D image")
    roi = tuple(int(r) for r in roi_size)
    if max_batch_voxels is None:
        max_batch_voxels = default_batch_voxels(image.device)
    if sw_batch_size == "auto":
        sw_batch_size = auto_window_batch(image.shape[2:], roi, overlap, k, max_voxels=max_batch_voxels)
    elif not isinstance(sw_batch_size, int) or sw_batch_size < 1:
        raise ValueError(f"sw_batch_size must be a positive integer or 'auto', got {sw_batch_size!r}")
    masks = masks.to(image.device)
    union = masks.any(dim=0, keepdim=True)
    encode_once = one_pass and hasattr(network, "decode_subsets")
    window_voxels = math.prod(roi)

    def predictor(x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if channels_last:
            x = _channels_last(x)
        chunk = _even_split(k, max_batch_voxels // (n * window_voxels))  # masks per network call
        features = network.encode(x, union.expand(n, m)) if encode_once else None
        outs = []
        for start in range(0, k, chunk):
            part = masks[start : start + chunk]
            kc = part.shape[0]
            if features is not None:
                out = network.decode_subsets(features, part).logits  # (n * kc, R, *S), sample-major
            else:
                xx = x.unsqueeze(1).expand(n, kc, *x.shape[1:]).reshape(n * kc, *x.shape[1:])
                out = network(xx, part.unsqueeze(0).expand(n, kc, m).reshape(n * kc, m))
            outs.append(out.reshape(n, kc, *out.shape[1:]))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)  # (n, K, R, *S)
        if blend == "mean_prob":
            out = out.sigmoid() if activation == "sigmoid" else out.softmax(dim=2)
        return out.reshape(n, -1, *out.shape[3:])

    with torch.inference_mode():
        blended = torch.as_tensor(sliding_window_inference(
            image, roi_size=roi, sw_batch_size=sw_batch_size, predictor=predictor, overlap=overlap,
            mode="constant" if blend == "mean_prob" else "gaussian",
        ))
    blended = blended.reshape(k, -1, *blended.shape[2:])
    if blend == "mean_prob":  # a new, plain tensor (computed outside inference mode)
        return _probabilities_to_logits(blended, activation)
    return blended.clone()  # a plain tensor, which callers may modify in place
