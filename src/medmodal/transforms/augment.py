"""Training-patch augmentation on MONAI transforms, seeded per sample (2D and 3D from one code path).

:class:`PatchAugmentation` is a deterministic function of ``(patch, seed)``: the data set gives every sample a
seed derived from ``(run seed, epoch, sample index)`` (:class:`medmodal.data.sampling.PatchDataset`), the
transform seeds its MONAI pipeline with it (``Compose.set_random_state``), so a run is reproducible, a resumed
run draws what the uninterrupted one would have, and the global RNGs are never touched.

The transforms and their defaults follow the list of ShaSpec's released code (spec ``shaspec.md`` §2.6, taken
from nnU-Net's batchgenerators pipeline), in its order:

============== ================================================ =================== ==========================
name           MONAI transform                                  default range       ShaSpec code: p, range
============== ================================================ =================== ==========================
rescale        ``RandZoomd`` (isotropic, keeps the size)        zoom 0.9–1.1        0.5, crop ×0.9–1.1
affine         ``RandAffined`` (rotation + isotropic scale)     ±15° per axis,      rotation 0.2, scale 0.2
                                                                scale 0.85–1.25
elastic        ``Rand2DElasticd`` / ``Rand3DElasticd``          σ 9–13, α 0–900     0.2
flip           ``RandFlipd``, each axis independently           —                   0.5 per axis
noise          ``RandGaussianNoised``                           std ≤ 0.1           0.1, variance ≤ 0.1
blur           ``RandGaussianSmoothd``                          σ 0.5–1             0.2
brightness     ``RandScaleIntensityd`` (multiplicative)         ×0.75–1.25          0.15
contrast       ``RandScaleIntensityFixedMeand`` (range kept)    ×0.75–1.25          0.15
low_resolution ``RandSimulateLowResolutiond``                   zoom 0.5–1          0.25
gamma          ``RandAdjustContrastd`` (statistics kept)        γ 0.7–1.5           0.15
============== ================================================ =================== ==========================

Differences from the released code, stated: rotation and scale share one probability (one ``RandAffined``);
intensity transforms act on all channels of a sample at once (batchgenerators draws some per channel); the
noise draws its standard deviation, not its variance, uniformly. Spatial transforms are applied to a window
larger than the patch (:attr:`PatchAugmentation.input_size`) and the patch is cut from its centre, so rotated
or zoomed-out patches rarely show the zero padding.

Images are resampled bilinearly, the label map with nearest neighbour, so it keeps its integer values
(regions are derived from it afterwards). Missing modalities (zero channels) are zero again on output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import (
    CenterSpatialCropd,
    Compose,
    MapTransform,
    Rand2DElasticd,
    Rand3DElasticd,
    RandAdjustContrastd,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandomizableTransform,
    RandScaleIntensityd,
    RandScaleIntensityFixedMeand,
    RandSimulateLowResolutiond,
    RandZoomd,
)

#: the transforms in the order they are applied (the names of the ``*_prob`` arguments).
TRANSFORMS = ("rescale", "affine", "elastic", "flip", "noise", "blur", "brightness", "contrast", "low_resolution",
              "gamma")
#: the probabilities of ShaSpec's released pipeline (elastic off: see ``benchmarks/augmentation.py``).
NNUNET_LIKE = {"rescale": 0.5, "affine": 0.2, "elastic": 0.0, "flip": 0.5, "noise": 0.1, "blur": 0.2,
               "brightness": 0.15, "contrast": 0.15, "low_resolution": 0.25, "gamma": 0.15}
_LINEAR = {2: "bilinear", 3: "trilinear"}


def _pair(name: str, value: Sequence[float], *, low: float | None = None) -> tuple[float, float]:
    a, b = (float(v) for v in value)
    if not a <= b or (low is not None and a < low):
        raise ValueError(f"{name} must be an increasing pair{'' if low is None else f' >= {low}'}, got {value}")
    return a, b


class PatchAugmentation:
    """Random spatial and intensity augmentation of one training patch (see the module docstring).

    Every transform is off unless its ``*_prob`` is positive, so ``PatchAugmentation(spatial_dims=…,
    patch_size=…)`` is the identity (apart from the centre crop of :attr:`input_size`, which then equals
    ``patch_size``).

    Args:
        spatial_dims: 2 or 3.
        patch_size: the output patch ``P`` (one entry per spatial axis).
        rescale_prob, rescale_range: isotropic zoom of the input window, ``> 1`` enlarges the content.
        affine_prob: probability of one random rotation + isotropic scaling.
        rotate_degrees: rotations are uniform in ``±rotate_degrees`` about each axis (one angle in 2D).
        scale_range: scale factor of the sampling grid; ``> 1`` shrinks the content (zooms out).
        elastic_prob, elastic_sigma, elastic_magnitude: elastic deformation (smoothing σ and displacement
            magnitude as batchgenerators' ``sigma``/``alpha``: offsets U(-1, 1), Gaussian-smoothed, times the
            magnitude (``Rand3DElasticd``). 2D uses ``Rand2DElasticd`` with control points every σ voxels and
            offsets of the same standard deviation. Costly in 3D (see ``benchmarks/augmentation.py``).
        flip_prob: probability of a flip about each spatial axis, independently.
        noise_prob, noise_std: additive Gaussian noise, its standard deviation uniform in ``[0, noise_std]``.
        blur_prob, blur_sigma: Gaussian smoothing with σ uniform in ``blur_sigma`` per axis.
        brightness_prob, brightness_range: multiply the intensities by a factor in ``brightness_range``.
        contrast_prob, contrast_range: scale the intensities about their mean, then clip to the former range.
        low_resolution_prob, low_resolution_zoom: down-sample (nearest) by a factor in the range and up-sample
            back (linear).
        gamma_prob, gamma_range: gamma on the min–max normalised intensities, mean and std restored.
    """

    def __init__(
        self,
        *,
        spatial_dims: int,
        patch_size: Sequence[int],
        rescale_prob: float = 0.0,
        rescale_range: Sequence[float] = (0.9, 1.1),
        affine_prob: float = 0.0,
        rotate_degrees: float = 15.0,
        scale_range: Sequence[float] = (0.85, 1.25),
        elastic_prob: float = 0.0,
        elastic_sigma: Sequence[float] = (9.0, 13.0),
        elastic_magnitude: Sequence[float] = (0.0, 900.0),
        flip_prob: float = 0.0,
        noise_prob: float = 0.0,
        noise_std: float = 0.1,
        blur_prob: float = 0.0,
        blur_sigma: Sequence[float] = (0.5, 1.0),
        brightness_prob: float = 0.0,
        brightness_range: Sequence[float] = (0.75, 1.25),
        contrast_prob: float = 0.0,
        contrast_range: Sequence[float] = (0.75, 1.25),
        low_resolution_prob: float = 0.0,
        low_resolution_zoom: Sequence[float] = (0.5, 1.0),
        gamma_prob: float = 0.0,
        gamma_range: Sequence[float] = (0.7, 1.5),
    ) -> None:
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.spatial_dims = spatial_dims
        self.patch_size = tuple(int(p) for p in patch_size)
        if len(self.patch_size) != spatial_dims or min(self.patch_size) < 1:
            raise ValueError(f"patch_size {tuple(patch_size)} must have {spatial_dims} positive entries")
        self.probs = {"rescale": rescale_prob, "affine": affine_prob, "elastic": elastic_prob, "flip": flip_prob,
                      "noise": noise_prob, "blur": blur_prob, "brightness": brightness_prob,
                      "contrast": contrast_prob, "low_resolution": low_resolution_prob, "gamma": gamma_prob}
        for name, p in self.probs.items():
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name}_prob must be in [0, 1], got {p}")
        if rotate_degrees < 0 or noise_std < 0:
            raise ValueError("rotate_degrees and noise_std must be >= 0")
        self.settings: dict[str, Any] = {
            "rescale_range": _pair("rescale_range", rescale_range, low=1e-3),
            "rotate_degrees": float(rotate_degrees),
            "scale_range": _pair("scale_range", scale_range, low=1e-3),
            "elastic_sigma": _pair("elastic_sigma", elastic_sigma, low=0.0),
            "elastic_magnitude": _pair("elastic_magnitude", elastic_magnitude, low=0.0),
            "noise_std": float(noise_std),
            "blur_sigma": _pair("blur_sigma", blur_sigma, low=0.0),
            "brightness_range": _pair("brightness_range", brightness_range, low=0.0),
            "contrast_range": _pair("contrast_range", contrast_range, low=0.0),
            "low_resolution_zoom": _pair("low_resolution_zoom", low_resolution_zoom, low=1e-3),
            "gamma_range": _pair("gamma_range", gamma_range, low=1e-3),
        }
        if self.settings["low_resolution_zoom"][1] > 1.0:
            raise ValueError(f"low_resolution_zoom must be <= 1, got {low_resolution_zoom}")
        self.input_size = self._input_size()
        self._pipeline: Any = None  # built on first use (in the DataLoader worker), never pickled

    @property
    def active(self) -> bool:
        """Whether any transform can fire."""
        return any(p > 0 for p in self.probs.values())

    def _input_size(self) -> tuple[int, ...]:
        """The window read around the patch: large enough that the largest rotation, scale and zoom-out draw
        no voxel from outside it (each axis ``P + 2·margin``, so the patch sits exactly at its centre)."""
        s = self.settings
        context = 1.0
        if self.probs["affine"] > 0:
            theta = math.radians(min(s["rotate_degrees"], 45.0))
            # a rotation about each axis in turn: every axis picks up (cos + sin) per rotation through it
            turns = 1 if self.spatial_dims == 2 else 2
            context *= max(1.0, s["scale_range"][1]) * (math.cos(theta) + math.sin(theta)) ** turns
        if self.probs["rescale"] > 0:
            context /= min(1.0, s["rescale_range"][0])
        context = min(context, 2.0)  # beyond this the border is cheaper than the read
        return tuple(p + 2 * math.ceil((context - 1.0) * p / 2) for p in self.patch_size)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pipeline": None}

    def describe(self) -> str:
        """One line listing the active transforms with their probability and range (for the run log)."""
        s = self.settings
        what = {
            "rescale": f"zoom {s['rescale_range'][0]:g}-{s['rescale_range'][1]:g}",
            "affine": f"rotate ±{s['rotate_degrees']:g}°, scale {s['scale_range'][0]:g}-{s['scale_range'][1]:g}",
            "elastic": f"sigma {s['elastic_sigma'][0]:g}-{s['elastic_sigma'][1]:g}, "
                       f"magnitude {s['elastic_magnitude'][0]:g}-{s['elastic_magnitude'][1]:g}",
            "flip": "each axis",
            "noise": f"std <= {s['noise_std']:g}",
            "blur": f"sigma {s['blur_sigma'][0]:g}-{s['blur_sigma'][1]:g}",
            "brightness": f"x{s['brightness_range'][0]:g}-{s['brightness_range'][1]:g}",
            "contrast": f"x{s['contrast_range'][0]:g}-{s['contrast_range'][1]:g}",
            "low_resolution": f"zoom {s['low_resolution_zoom'][0]:g}-{s['low_resolution_zoom'][1]:g}",
            "gamma": f"{s['gamma_range'][0]:g}-{s['gamma_range'][1]:g}",
        }
        parts = [f"{name} p={p:g} ({what[name]})" for name, p in self.probs.items() if p > 0]
        return "; ".join(parts) if parts else "none"

    def _build(self) -> Compose:
        p, s, d = self.probs, self.settings, self.spatial_dims
        both, img = ["image", "label"], ["image"]
        modes = (_LINEAR[d], "nearest-exact")  # for interpolation (zoom): voxel centres stay aligned
        modes_nearest = ("bilinear", "nearest")  # for grid resampling (affine, elastic)
        out: list[Any] = []
        if p["rescale"] > 0:
            lo, hi = s["rescale_range"]
            out.append(RandZoomd(keys=both, prob=p["rescale"], min_zoom=lo, max_zoom=hi, mode=modes,
                                 padding_mode="constant", keep_size=True, allow_missing_keys=True))
        if p["affine"] > 0:
            angle = math.radians(s["rotate_degrees"])
            lo, hi = s["scale_range"]
            affine = RandAffined(keys=both, prob=1.0, rotate_range=[(-angle, angle)] * (1 if d == 2 else 3),
                                 scale_range=[(lo - 1.0, hi - 1.0)] * d, spatial_size=self.patch_size,
                                 mode=modes_nearest, padding_mode="zeros", allow_missing_keys=True)
            out.append(_AffineOrCrop(prob=p["affine"], affine=affine, crop=CenterSpatialCropd(
                keys=both, roi_size=self.patch_size, allow_missing_keys=True)))
        else:
            out.append(CenterSpatialCropd(keys=both, roi_size=self.patch_size, allow_missing_keys=True))
        if p["elastic"] > 0:
            sig, mag = s["elastic_sigma"], s["elastic_magnitude"]
            if d == 3:  # offsets U(-1, 1), Gaussian-smoothed with sigma, times the magnitude (batchgenerators)
                elastic: Any = Rand3DElasticd(keys=both, prob=p["elastic"], sigma_range=sig, magnitude_range=mag,
                                              mode=modes_nearest, padding_mode="zeros", allow_missing_keys=True)
            else:  # control points every sigma voxels with normal offsets of the same std as the 3D-style field
                rms = _smoothed_uniform_std(sum(sig) / 2, d)
                elastic = Rand2DElasticd(keys=both, prob=p["elastic"], spacing=sum(sig) / 2,
                                         magnitude_range=(mag[0] * rms, mag[1] * rms), mode=modes_nearest,
                                         padding_mode="zeros", allow_missing_keys=True)
            out.append(elastic)
        if p["flip"] > 0:
            out += [RandFlipd(keys=both, prob=p["flip"], spatial_axis=a, allow_missing_keys=True) for a in range(d)]
        if p["noise"] > 0:
            out.append(RandGaussianNoised(keys=img, prob=p["noise"], std=s["noise_std"], sample_std=True))
        if p["blur"] > 0:
            sig = s["blur_sigma"]
            out.append(RandGaussianSmoothd(keys=img, prob=p["blur"], sigma_x=sig, sigma_y=sig, sigma_z=sig))
        if p["brightness"] > 0:
            lo, hi = s["brightness_range"]
            out.append(RandScaleIntensityd(keys=img, prob=p["brightness"], factors=(lo - 1.0, hi - 1.0)))
        if p["contrast"] > 0:
            lo, hi = s["contrast_range"]
            out.append(RandScaleIntensityFixedMeand(keys=img, prob=p["contrast"], factors=(lo - 1.0, hi - 1.0),
                                                    fixed_mean=True, preserve_range=True))
        if p["low_resolution"] > 0:
            out.append(RandSimulateLowResolutiond(keys=img, prob=p["low_resolution"],
                                                  zoom_range=s["low_resolution_zoom"], downsample_mode="nearest",
                                                  upsample_mode=_LINEAR[d]))
        if p["gamma"] > 0:
            out.append(RandAdjustContrastd(keys=img, prob=p["gamma"], gamma=s["gamma_range"], retain_stats=True))
        return Compose(out)

    def __call__(
        self, image: np.ndarray, label: np.ndarray | None, *, available: np.ndarray, seed: int
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Augment one sample; the same ``seed`` gives the same output.

        Args:
            image: ``(M, *R) float32``, ``R`` = :attr:`input_size`, missing modalities zero.
            label: ``(*R)`` integer label map, or ``None``.
            available: ``(M,) bool``; the channels of missing modalities are zero on output.
            seed: the sample's seed, ``0 <= seed < 2**32``.

        Returns:
            ``image (M, *P) float32`` and ``label (*P)`` of the input dtype (or ``None``), ``P`` =
            :attr:`patch_size`.
        """
        if tuple(image.shape[1:]) != self.input_size:
            raise ValueError(f"expected an image (M, *{self.input_size}), got {tuple(image.shape)}")
        if self._pipeline is None:
            self._pipeline = self._build()
        self._pipeline.set_random_state(seed=int(seed))
        data: dict[str, Any] = {"image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))}
        if label is not None:
            data["label"] = torch.from_numpy(np.ascontiguousarray(label, dtype=np.float32))[None]
        data = self._pipeline(data)
        out = torch.as_tensor(data["image"]).numpy().astype(np.float32, copy=False)
        out[~np.asarray(available, dtype=bool)] = 0.0
        seg = None
        if label is not None:
            seg = np.rint(torch.as_tensor(data["label"]).numpy()[0]).astype(label.dtype)
        return np.ascontiguousarray(out), seg


def _smoothed_uniform_std(sigma: float, spatial_dims: int) -> float:
    """Standard deviation of U(-1, 1) white noise after a unit-sum Gaussian filter of width ``sigma``."""
    return math.sqrt(1.0 / 3.0) * (2.0 * math.sqrt(math.pi) * max(sigma, 1e-3)) ** (-spatial_dims / 2)


class _AffineOrCrop(RandomizableTransform, MapTransform):
    """With probability ``prob`` the random affine (which outputs the patch), otherwise a plain centre crop, so
    an unrotated patch is cut out, not resampled through an identity grid."""

    def __init__(self, *, prob: float, affine: RandAffined, crop: CenterSpatialCropd) -> None:
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, keys=["image", "label"], allow_missing_keys=True)
        self.affine, self.crop = affine, crop

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> _AffineOrCrop:
        super().set_random_state(seed=seed, state=state)
        self.affine.set_random_state(seed=int(self.R.randint(2**32 - 1, dtype="uint32")))
        return self

    def __call__(self, data: dict) -> dict:
        self.randomize(None)
        return self.affine(data) if self._do_transform else self.crop(data)
