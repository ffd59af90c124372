"""Filling missing modalities with a trained M2DN network (reverse diffusion) or its regression baseline.

Shapes: ``x_obs (B, M, *S)`` in model space [−1, 1] (missing channels hold anything: they are never read by the
regression baseline and replaced by noise in diffusion), ``available (B, M)`` bool (True = given as input).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from medmodal.methods.m2dn.diffusion import MaskedDiffusion

Mode = Literal["diffusion", "regression"]


@dataclass(frozen=True)
class SamplerSettings:
    """How missing channels are filled: the reverse process (``sampler``, ``steps``, ``eta``, ``clip``) and the
    seed of its noise. ``steps=None`` runs every timestep."""

    sampler: Literal["ddpm", "ddim"] = "ddpm"
    steps: int | None = None
    eta: float = 0.0
    clip: bool = True
    seed: int = 0

    def describe(self, mode: Mode, timesteps: int) -> str:
        if mode == "regression":
            return "direct regression (one forward pass)"
        n = self.steps or timesteps
        eta = f", eta {self.eta:g}" if self.sampler == "ddim" else ""
        return f"{self.sampler.upper()} {n} of {timesteps} steps{eta}, seed {self.seed}"


def case_patterns(present: Sequence[bool]) -> list[tuple[bool, ...]]:
    """The scenarios a case can be scored under: partial patterns whose given modalities are present and that
    leave at least one present modality to synthesise (all ``2^M − 2`` for a complete case)."""
    from medmodal.evaluation.synthesis import all_scenarios

    return [p for p in all_scenarios(len(present))
            if all(h or not a for a, h in zip(p, present, strict=True))
            and any(h and not a for a, h in zip(p, present, strict=True))]


def regression_input(x_obs: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
    """The regression baseline's input: missing channels set to 0 (mid-range of [−1, 1])."""
    keep = available[(...,) + (None,) * (x_obs.ndim - 2)]
    return torch.where(keep, x_obs, torch.zeros((), dtype=x_obs.dtype, device=x_obs.device))


@torch.no_grad()
def fill_missing(
    network: nn.Module,
    x_obs: torch.Tensor,
    available: torch.Tensor,
    *,
    mode: Mode,
    diffusion: MaskedDiffusion,
    settings: SamplerSettings,
    generator: torch.Generator,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """``(B, M, *S)``: ``x_obs`` on the available channels (bit-exact), the network's images on the others.

    Args:
        network: ``forward(x_t, available, timestep) -> x̂0`` (:class:`medmodal.networks.m2dn.M2DNDenoiser`).
        mode: ``"diffusion"`` (reverse process of spec §2.4) or ``"regression"`` (one pass, missing = 0).
        generator: the source of the sampling noise (never the global RNG; spec §3 invariant 10).
    """
    keep = available[(...,) + (None,) * (x_obs.ndim - 2)]
    if mode == "regression":
        t = torch.zeros(x_obs.shape[0], dtype=torch.long, device=x_obs.device)
        pred = network(regression_input(x_obs, available), available, t)
        if settings.clip:
            pred = pred.clamp(-1.0, 1.0)
        return torch.where(keep, x_obs, pred)

    def fn(x_t: torch.Tensor, avail: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return network(x_t, avail, t)

    return diffusion.sample(fn, x_obs, available, generator=generator, sampler=settings.sampler,
                            steps=settings.steps, eta=settings.eta, clip=(-1.0, 1.0) if settings.clip else None,
                            callback=callback)


def inference_device(requested: str | None = None) -> torch.device:
    """``"cuda"`` / ``"cpu"`` as asked; ``None`` or ``"auto"``: the GPU when there is one."""
    if requested in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested not in ("cpu", "cuda"):
        raise ValueError(f"--device: expected auto, cpu or cuda, got {requested!r}")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: this machine has no CUDA GPU; use --device cpu")
    return torch.device(requested)


def case_seed(seed: int, case_id: str) -> int:
    """A per-case seed: the same on every rank, in every process and in any case order."""
    return (int(seed) * 1_000_003 + zlib.crc32(case_id.encode())) % (2**63)


def case_generator(seed: int, case_id: str, device: torch.device | str = "cpu") -> torch.Generator:
    """The sampling-noise generator of one case on ``device`` (a GPU draws other numbers than the CPU for the
    same seed: synthesis is reproducible per device)."""
    return torch.Generator(device=torch.device(device)).manual_seed(case_seed(seed, case_id))


def batched(n: int, size: int) -> Iterator[slice]:
    """Consecutive slices of ``range(n)`` of at most ``size`` items."""
    for start in range(0, n, max(1, size)):
        yield slice(start, min(n, start + size))


def settings_from(recorded: dict[str, Any], options: dict[str, Any] | None = None) -> SamplerSettings:
    """The run's recorded sampler settings (``run.json`` ``inference``), overridden by non-``None`` options."""
    values = {k: recorded[k] for k in ("sampler", "steps", "eta", "clip", "seed") if k in recorded}
    for k, v in (options or {}).items():
        if k in ("sampler", "steps", "eta", "seed") and v is not None:
            values[k] = v
    if values.get("sampler") not in ("ddpm", "ddim"):
        raise ValueError(f"--sampler: expected ddpm or ddim, got {values.get('sampler')!r}")
    if not 0.0 <= float(values.get("eta", 0.0)) <= 1.0:
        raise ValueError(f"--eta: expected a value in [0, 1], got {values.get('eta')}")
    if values["sampler"] == "ddpm":
        if (options or {}).get("eta"):
            raise ValueError("--eta is a DDIM setting; add --sampler ddim")
        values["eta"] = 0.0  # DDPM's posterior noise is fixed; eta is DDIM's
    return SamplerSettings(**values)


@torch.no_grad()
def fill_case(
    network: nn.Module,
    image: torch.Tensor,
    patterns: torch.Tensor,
    *,
    model_dims: int,
    mode: Mode,
    diffusion: MaskedDiffusion,
    settings: SamplerSettings,
    batch_size: int,
    generator: torch.Generator,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Fill one case under ``K`` availability patterns: ``image (M, *S)`` in model space, ``patterns (K, M)``
    bool → ``(K, M, *S)``.

    A 2D model on a 3D case works slice by slice along the last axis (axial for RAS-oriented volumes); the
    ``K × S_last`` slices, or the ``K`` images when the model has the case's dimension, go through the sampler in
    batches of ``batch_size`` drawn from one ``generator``, on the network's device (the generator must be there
    too); the result is on the CPU. ``progress(n)`` is called with the items done.
    """
    device = next(network.parameters()).device
    case_dims = image.ndim - 1
    if model_dims not in (case_dims, case_dims - 1) or (model_dims == 2 and case_dims == 1):
        raise ValueError(f"a {model_dims}D model cannot fill a {case_dims}D case")
    k = patterns.shape[0]
    if model_dims == case_dims:
        items = image[None].expand(k, *image.shape)
        avail = patterns
    else:  # (K, M, *S2, Z) -> (K·Z, M, *S2)
        z = image.shape[-1]
        items = image.movedim(-1, 0)[None].expand(k, z, *image.shape[:-1]).reshape(k * z, *image.shape[:-1])
        avail = patterns.repeat_interleave(z, dim=0)
    out = torch.empty(items.shape, dtype=items.dtype)
    for part in batched(items.shape[0], batch_size):
        out[part] = fill_missing(network, items[part].contiguous().to(device), avail[part].to(device), mode=mode,
                                 diffusion=diffusion, settings=settings, generator=generator).cpu()
        if progress is not None:
            progress(part.stop - part.start)
    if model_dims == case_dims:
        return out
    return out.reshape(k, image.shape[-1], *image.shape[:-1]).movedim(1, -1)
