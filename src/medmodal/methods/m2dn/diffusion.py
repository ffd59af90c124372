"""The modality-masked diffusion of M2DN (IEEE TMI 2024, spec ``shared/methods/m2dn.md`` §2): pure torch.

Only the channels marked missing are diffused; the available ones stay clean and act as the condition (spec §2.2):

    x_t = a ⊙ x₀ + v ⊙ (√ᾱ_t · x₀ + √(1 − ᾱ_t) · ε),   v = 1 − a

and the reverse process (spec §2.4) samples the missing channels from the DDPM posterior (or a DDIM update) and puts
the clean available channels back after every step.

Tensors follow the M2DN conventions: images ``(B, M, *S)`` with ``S`` = ``(H, W)`` or ``(D, H, W)``, ``available``
``(B, M)`` bool (True = given as input), intensities in [-1, 1]. A denoiser is a callable
``fn(x_t, available, t) -> out`` returning ``(B, M, *S)`` in the objective's parametrisation (x̂₀ for ``pred_x0``,
ε̂ for ``pred_eps``).

**Timestep index.** ``t`` is a 0-based index in ``[0, T)``: index ``k`` is the paper's step ``k + 1`` (``ᾱ[k] =
Π_{s≤k} α_s``), so the paper's ``t = 1`` (the last reverse step, posterior variance 0) is index 0, and the paper's
``t = T`` (pure noise) is index ``T − 1``. The network sees the index.

**Randomness.** Every random draw takes an explicit ``torch.Generator`` (spec §3 invariant 10); no function here
reads the global RNG. The generator must live on the device of the tensors it draws for.

**What comes from MONAI.** The β schedules are MONAI's ``NoiseSchedules`` (``linear_beta``; ``cosine`` of Nichol &
Dhariwal 2021), the same tables ``monai.networks.schedulers.DDPMScheduler``/``DDIMScheduler`` build. The update
formulas are written here, because MONAI's ``step`` methods cannot express them: ``DDPMScheduler.step`` always
steps from ``t`` to ``t − 1`` (no respaced DDPM with fewer steps), ``DDIMScheduler.step`` goes from ``t`` to
``t − T // steps`` while its own ``set_timesteps`` grid is ``linspace(T − 1, 0, steps).round()`` (the two disagree,
so every step would start from the wrong noise level), and both take one Python ``int`` timestep. The tests check
that the formulas here equal MONAI's ``DDPMScheduler`` posterior and ``DDIMScheduler.step`` where those are defined.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Literal

import torch
from monai.networks.schedulers import NoiseSchedules
from torch import nn
from torch.optim.swa_utils import get_ema_multi_avg_fn

__all__ = ["Denoiser", "MaskedDiffusion", "ema_update", "partial_patterns"]

#: ``fn(x_t (B, M, *S), available (B, M) bool, t (B,) long) -> (B, M, *S)``
Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@functools.lru_cache(maxsize=16)
def partial_patterns(num_modalities: int) -> torch.Tensor:
    """Every missing pattern of ``num_modalities`` channels, ``(2^M, M)`` bool (True = missing), row ``i`` being the
    binary digits of ``i`` (channel 0 the least significant). Row 0 is none-missing, the last row all-missing."""
    if num_modalities < 1:
        raise ValueError(f"need at least one modality, got {num_modalities}")
    codes = torch.arange(2**num_modalities).unsqueeze(1)
    return (codes >> torch.arange(num_modalities)) & 1 == 1


def _check_generator(generator: torch.Generator, device: torch.device, what: str) -> None:
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"{what}: generator must be a torch.Generator (the global RNG is never used)")
    if generator.device.type != device.type:
        raise ValueError(
            f"{what}: the generator is on {generator.device} but the tensors are on {device}; create it with "
            f"torch.Generator(device={device.type!r}).manual_seed(seed)"
        )


def _randn(shape: torch.Size, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=like.device, dtype=like.dtype)


class MaskedDiffusion:
    """Forward noising, mask sampling, loss and reverse sampling of M2DN (IEEE TMI 2024, spec §2).

    Args:
        timesteps: T, the number of diffusion steps (spec §2.5 default 1000).
        beta_schedule: ``linear`` (β from ``beta_start`` to ``beta_end``, MONAI ``linear_beta``) or ``cosine``
            (Nichol & Dhariwal 2021 with s = 0.008 and β clipped to 0.999, MONAI ``cosine``; ``beta_start`` and
            ``beta_end`` are not used by it).
        beta_start, beta_end: the linear schedule's end points. These defaults are DDPM's for T = 1000; with fewer
            steps they leave much signal at t = T (ᾱ_T ≈ 0.37 for T = 100), so the N(0, I) start of sampling is
            off; scale both by 1000 / T (the convention of Nichol & Dhariwal 2021) for short schedules.
        objective: what the network predicts, ``pred_x0`` (the paper, spec §2.2) or ``pred_eps`` (ablation, spec
            §2.5: the noise of the missing channels only).
    """

    def __init__(
        self,
        *,
        timesteps: int = 1000,
        beta_schedule: Literal["linear", "cosine"] = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 2e-2,
        objective: Literal["pred_x0", "pred_eps"] = "pred_x0",
    ) -> None:
        if timesteps < 1:
            raise ValueError(f"timesteps must be at least 1, got {timesteps}")
        if objective not in ("pred_x0", "pred_eps"):
            raise ValueError(f"objective must be 'pred_x0' or 'pred_eps', got {objective!r}")
        if beta_schedule == "linear":
            if not 0.0 < beta_start <= beta_end < 1.0:
                raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {beta_start} and {beta_end}")
            betas = NoiseSchedules["linear_beta"](timesteps, beta_start=beta_start, beta_end=beta_end)
        elif beta_schedule == "cosine":
            betas = NoiseSchedules["cosine"](timesteps)[0]
        else:
            raise ValueError(f"beta_schedule must be 'linear' or 'cosine', got {beta_schedule!r}")
        self.timesteps = int(timesteps)
        self.beta_schedule = beta_schedule
        self.objective = objective
        self._betas = betas.to(torch.float64)
        self._alphas_cumprod = torch.cumprod(1.0 - self._betas, dim=0)
        self._tables: dict[tuple[str, torch.device], torch.Tensor] = {}

    # ------------------------------------------------------------------ schedule
    @property
    def betas(self) -> torch.Tensor:
        """β, ``(T,)`` float64; index ``k`` is the paper's β_{k+1}."""
        return self._betas.clone()

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """ᾱ, ``(T,)`` float64, strictly decreasing in (0, 1); index ``k`` is the paper's ᾱ_{k+1}."""
        return self._alphas_cumprod.clone()

    def _alpha_bar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """ᾱ at index ``t`` ``(B,)`` (index −1 = 1, the clean image), shaped ``(B, 1, ..., 1)`` like ``like``."""
        key = ("abar", t.device)
        if key not in self._tables:  # float64 where the device has it, padded with ᾱ = 1 for index -1
            dtype = torch.float32 if t.device.type == "mps" else torch.float64
            padded = torch.cat([torch.ones(1, dtype=torch.float64), self._alphas_cumprod])
            self._tables[key] = padded.to(device=t.device, dtype=dtype)
        value = self._tables[key][t.long() + 1]
        return value.reshape(-1, *([1] * (like.ndim - 1)))

    def _check_t(self, t: torch.Tensor, batch: int, *, allow_clean: bool = False) -> None:
        if t.ndim != 1 or t.shape[0] != batch or t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"t must be a (B,) = ({batch},) integer tensor, got {tuple(t.shape)} {t.dtype}")
        low = -1 if allow_clean else 0
        if t.numel() and (int(t.min()) < low or int(t.max()) >= self.timesteps):
            raise ValueError(f"t must be a 0-based index in [{low}, {self.timesteps}), got [{int(t.min())}, "
                             f"{int(t.max())}]")

    @staticmethod
    def _check_images(x: torch.Tensor, available: torch.Tensor, what: str) -> None:
        if x.ndim < 3:
            raise ValueError(f"{what} must be (B, M, *S) with 1 to 3 spatial dimensions, got {tuple(x.shape)}")
        if available.dtype != torch.bool or tuple(available.shape) != tuple(x.shape[:2]):
            raise ValueError(f"available must be a (B, M) = {tuple(x.shape[:2])} bool tensor, got "
                             f"{tuple(available.shape)} {available.dtype}")

    @staticmethod
    def _channels(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return mask.reshape(*mask.shape, *([1] * (like.ndim - 2)))

    # ------------------------------------------------------------------ training
    def q_sample(
        self, x0: torch.Tensor, available: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """Diffuse the missing channels to step ``t`` and keep the available ones clean (spec §2.2).

        Args:
            x0: clean images ``(B, M, *S)``.
            available: ``(B, M)`` bool, True = kept clean (the condition).
            t: ``(B,)`` long, 0-based step index in ``[0, T)`` (the paper's ``t − 1``).
            noise: ε ``(B, M, *S)``, e.g. ``torch.randn(x0.shape, generator=g)``.

        Returns:
            x_t ``(B, M, *S)``; the available channels are x₀ bit for bit (``torch.where``, no arithmetic).
        """
        self._check_images(x0, available, "x0")
        self._check_t(t, x0.shape[0])
        if noise.shape != x0.shape:
            raise ValueError(f"noise must have the shape of x0 {tuple(x0.shape)}, got {tuple(noise.shape)}")
        abar = self._alpha_bar(t, x0)
        noisy = abar.sqrt().to(x0.dtype) * x0 + (1.0 - abar).sqrt().to(x0.dtype) * noise
        return torch.where(self._channels(available, x0), x0, noisy)

    def sample_timesteps(self, batch: int, *, generator: torch.Generator) -> torch.Tensor:
        """``(batch,)`` long indices uniform in ``[0, T)`` (the paper's ``t ~ U{1..T}``), on the generator's
        device."""
        if batch < 0:
            raise ValueError(f"batch must be non-negative, got {batch}")
        if not isinstance(generator, torch.Generator):
            raise ValueError("sample_timesteps: generator must be a torch.Generator (the global RNG is never used)")
        return torch.randint(0, self.timesteps, (batch,), generator=generator, device=generator.device)

    @staticmethod
    def sample_missing(present: torch.Tensor, *, generator: torch.Generator,
                       max_missing: int | None = None) -> torch.Tensor:
        """Draw the simulated missing pattern of every row (spec §2.2), uniformly over its allowed patterns.

        A row with every channel present draws uniformly from the 2^M − 2 patterns that are neither none- nor
        all-missing. A row with truly absent channels (``present`` False, the spec's "incomplete training subjects"
        extension) has them missing in every draw and draws uniformly from the patterns that contain them and leave
        at least one present channel available (the pattern "only the absent ones missing" is one of them).

        Args:
            present: ``(B, M)`` bool, True = the channel exists in the data. M ≤ 16 (patterns are enumerated).
            generator: on ``present``'s device.
            max_missing: draw only patterns that hide at most this many present channels (an easy-to-hard
                curriculum, MM-GAN's; ``None``: no limit).

        Returns:
            missing ``(B, M)`` bool (the M2DN mask v; ``available = present & ~missing``).

        Raises:
            ValueError: a row without a present channel, or all channels present with M < 2 (no partial pattern).
        """
        if present.ndim != 2 or present.dtype != torch.bool:
            raise ValueError(f"present must be a (B, M) bool tensor, got {tuple(present.shape)} {present.dtype}")
        batch, m = present.shape
        if m > 16:
            raise ValueError(f"sample_missing enumerates the 2^M patterns; M = {m} is too many (at most 16)")
        _check_generator(generator, present.device, "sample_missing")
        empty = ~present.any(dim=1)
        if empty.any():
            raise ValueError(f"rows {empty.nonzero().flatten().tolist()} of present have no present channel")
        patterns = partial_patterns(m).to(present.device)  # (P, M)
        absent = ~present
        # a pattern is allowed when it marks every absent channel missing, leaves a channel available and is not
        # none-missing (which only a complete row could draw)
        covers = ~(absent[:, None, :] & ~patterns[None]).any(dim=2)  # (B, P)
        allowed = covers & ~patterns.all(dim=1)[None] & patterns.any(dim=1)[None]
        if max_missing is not None:
            if max_missing < 1:
                raise ValueError(f"max_missing must be at least 1, got {max_missing}")
            hidden = (patterns[None] & present[:, None, :]).sum(dim=2)  # (B, P) present channels a pattern hides
            allowed &= hidden <= max_missing
        if batch == 0:
            return torch.zeros(0, m, dtype=torch.bool, device=present.device)
        if not allowed.any(dim=1).all():
            raise ValueError(f"with M = {m} every channel present leaves no partial pattern to simulate")
        index = torch.multinomial(allowed.to(torch.float32), 1, generator=generator).squeeze(1)
        return patterns[index]

    def loss(
        self,
        pred: torch.Tensor,
        x0: torch.Tensor,
        *,
        missing: torch.Tensor,
        present: torch.Tensor,
        loss_channels: Literal["all", "missing"],
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean squared error over the channels that count (spec §2.2, §2.5).

        ``pred_x0`` (the paper): the target is x₀. ``loss_channels="all"`` counts every present channel
        (self-reconstruction of the available ones + synthesis of the simulated-missing ones, the paper's "J");
        ``"missing"`` counts the simulated-missing present channels only. Truly absent channels never count.

        ``pred_eps`` (ablation, spec §2.5): the target is ``noise`` (ε of :meth:`q_sample`) on the missing present
        channels; the available channels carry no noise and are not in the loss, so only ``"missing"`` is accepted.

        The sum of squared errors over the counted ``(b, m)`` channels and all their voxels is divided by the number
        of those elements (counted channels × voxels, over the whole batch). With every channel present and
        ``"all"`` this is ``F.mse_loss(pred, x0)``. No counted channel gives 0 (with a zero gradient). Uncounted
        elements get an exact zero gradient, even where ``x0`` is not finite.

        Args:
            pred: the network output ``(B, M, *S)``.
            x0: clean images ``(B, M, *S)``.
            missing: ``(B, M)`` bool, the simulated pattern (True = diffused, given as noise).
            present: ``(B, M)`` bool, True = the channel exists in the data.
            loss_channels: ``all`` or ``missing``.
            noise: ε ``(B, M, *S)``, needed for ``pred_eps``.

        Returns:
            the scalar loss.
        """
        if pred.shape != x0.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and x0 {tuple(x0.shape)} must have the same shape")
        if x0.ndim < 3:
            raise ValueError(f"x0 must be (B, M, *S) with 1 to 3 spatial dimensions, got {tuple(x0.shape)}")
        for name, mask in (("missing", missing), ("present", present)):
            if mask.dtype != torch.bool or tuple(mask.shape) != tuple(x0.shape[:2]):
                raise ValueError(f"{name} must be a (B, M) = {tuple(x0.shape[:2])} bool tensor, got "
                                 f"{tuple(mask.shape)} {mask.dtype}")
        if loss_channels not in ("all", "missing"):
            raise ValueError(f"loss_channels must be 'all' or 'missing', got {loss_channels!r}")
        if self.objective == "pred_eps":
            if loss_channels != "missing":
                raise ValueError("objective 'pred_eps' has no target on the available channels (they carry no "
                                 "noise); use loss_channels 'missing'")
            if noise is None or noise.shape != x0.shape:
                raise ValueError("objective 'pred_eps' needs noise, the ε given to q_sample, shaped like x0")
            target = noise
        else:
            target = x0
        counted = present & missing if loss_channels == "missing" else present
        mask = self._channels(counted, pred).expand_as(pred)
        diff = torch.where(mask, pred - target, torch.zeros((), dtype=pred.dtype, device=pred.device))
        count = counted.sum() * math.prod(pred.shape[2:])
        return diff.square().sum() / count.clamp(min=1).to(pred.dtype)

    # ------------------------------------------------------------------ sampling
    def predict_x0(self, model_out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network output as x̂₀ ``(B, M, *S)``: itself for ``pred_x0``, ``(x_t − √(1−ᾱ_t) ε̂) / √ᾱ_t`` for
        ``pred_eps`` (meaningful on the diffused channels only). ``t`` ``(B,)`` long, 0-based."""
        if model_out.shape != x_t.shape:
            raise ValueError(f"model output {tuple(model_out.shape)} must have the shape of x_t {tuple(x_t.shape)}")
        if self.objective == "pred_x0":
            return model_out
        self._check_t(t, x_t.shape[0])
        abar = self._alpha_bar(t, x_t)
        return ((x_t - (1.0 - abar).sqrt().to(x_t.dtype) * model_out) / abar.sqrt().to(x_t.dtype)).to(x_t.dtype)

    def posterior(
        self, x0_hat: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, *, t_prev: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of q(x_s | x_t, x̂₀), spec §2.4, with s = ``t_prev`` (default ``t − 1``).

        With ᾱ_s = 1 for s = −1, α' = ᾱ_t / ᾱ_s and β' = 1 − α':

            μ̃ = √ᾱ_s β' / (1 − ᾱ_t) · x̂₀ + √α' (1 − ᾱ_s) / (1 − ᾱ_t) · x_t,   σ̃² = β' (1 − ᾱ_s) / (1 − ᾱ_t)

        For s = t − 1 (α' = α_t, β' = β_t) these are the spec's formulas; for a strided s they are the respaced DDPM
        posterior (Nichol & Dhariwal 2021). At index 0 (the paper's t = 1) μ̃ = x̂₀ exactly and σ̃² = 0.

        Args:
            x0_hat: ``(B, M, *S)`` predicted clean images.
            x_t: ``(B, M, *S)`` current sample.
            t: ``(B,)`` long, 0-based index in ``[0, T)``.
            t_prev: ``(B,)`` long in ``[-1, t)``, the index stepped to; −1 = the clean image.

        Returns:
            ``mean`` ``(B, M, *S)`` and ``variance`` ``(B, 1, ..., 1)`` in ``x_t``'s dtype.
        """
        self._check_t(t, x_t.shape[0])
        t_prev = t - 1 if t_prev is None else t_prev
        self._check_t(t_prev, x_t.shape[0], allow_clean=True)
        if bool((t_prev >= t).any()):
            raise ValueError("t_prev must be below t")
        abar_t, abar_s = self._alpha_bar(t, x_t), self._alpha_bar(t_prev, x_t)
        alpha = abar_t / abar_s
        beta = 1.0 - alpha
        coef_x0 = abar_s.sqrt() * beta / (1.0 - abar_t)
        coef_xt = alpha.sqrt() * (1.0 - abar_s) / (1.0 - abar_t)
        variance = beta * (1.0 - abar_s) / (1.0 - abar_t)
        mean = coef_x0.to(x_t.dtype) * x0_hat + coef_xt.to(x_t.dtype) * x_t
        return mean, variance.to(x_t.dtype)

    def ddim_step(
        self,
        x0_hat: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        *,
        t_prev: torch.Tensor,
        eta: float = 0.0,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One DDIM update from index ``t`` to ``t_prev`` (Song et al. 2021, eq. 12 and 16).

        ε̂ = (x_t − √ᾱ_t x̂₀) / √(1 − ᾱ_t),  σ = η √((1 − ᾱ_s)/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_s),
        x_s = √ᾱ_s x̂₀ + √(1 − ᾱ_s − σ²) ε̂ + σ z.

        ε̂ is derived from the (possibly clipped) x̂₀, as in guided-diffusion. η = 1 is the respaced DDPM posterior
        sample. Shapes as in :meth:`posterior`; ``noise`` z ``(B, M, *S)`` is needed when η > 0 and s ≥ 0.
        """
        self._check_t(t, x_t.shape[0])
        self._check_t(t_prev, x_t.shape[0], allow_clean=True)
        abar_t, abar_s = self._alpha_bar(t, x_t), self._alpha_bar(t_prev, x_t)
        sigma = eta * ((1.0 - abar_s) / (1.0 - abar_t) * (1.0 - abar_t / abar_s)).sqrt()
        eps = (x_t - abar_t.sqrt().to(x_t.dtype) * x0_hat) / (1.0 - abar_t).sqrt().to(x_t.dtype)
        direction = (1.0 - abar_s - sigma.square()).clamp(min=0.0).sqrt()
        out = abar_s.sqrt().to(x_t.dtype) * x0_hat + direction.to(x_t.dtype) * eps
        if eta > 0 and bool((sigma > 0).any()):
            if noise is None:
                raise ValueError("ddim_step with eta > 0 needs noise")
            out = out + sigma.to(x_t.dtype) * noise
        return out

    def inference_timesteps(self, steps: int | None = None) -> list[int]:
        """The descending 0-based indices visited by :meth:`sample`: all ``T − 1 … 0`` for ``steps=None``, else
        ``round(linspace(T − 1, 0, steps))`` (MONAI's ``set_timesteps`` grid; distinct for ``steps ≤ T``)."""
        if steps is None:
            return list(range(self.timesteps - 1, -1, -1))
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= self.timesteps:
            raise ValueError(f"steps must be an integer in [1, timesteps = {self.timesteps}] or None, got {steps!r}")
        grid = torch.linspace(self.timesteps - 1, 0, steps, dtype=torch.float64).round().long().tolist()
        return [int(v) for v in grid]

    @torch.no_grad()
    def sample(
        self,
        fn: Denoiser,
        x_obs: torch.Tensor,
        available: torch.Tensor,
        *,
        generator: torch.Generator,
        sampler: Literal["ddpm", "ddim"] = "ddpm",
        steps: int | None = None,
        eta: float = 0.0,
        clip: tuple[float, float] | None = (-1.0, 1.0),
        callback: Callable[[int, torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """Synthesise the missing channels (spec §2.4) under ``torch.no_grad``.

        The missing channels start as N(0, I) drawn from ``generator``, the available ones as ``x_obs``. At each
        index t of :meth:`inference_timesteps` (``steps``): x̂₀ = ``fn(x, available, t)`` (converted by
        :meth:`predict_x0`), clipped to ``clip``; the missing channels move to the next index by a posterior sample
        (``ddpm``: spec §2.4, with ``steps < T`` the respaced posterior between grid points) or a DDIM update
        (``ddim``, η = ``eta``); then the available channels are put back exactly. The result is
        ``a ⊙ x_obs + v ⊙ x̂₀`` of the last step; the self-reconstructions of available channels are never fed back.

        Args:
            fn: the denoiser ``fn(x_t, available, t) -> (B, M, *S)`` (``t`` a ``(B,)`` long index). Put a network
                in eval mode first.
            x_obs: ``(B, M, *S)`` inputs; only the available channels are read.
            available: ``(B, M)`` bool; every row needs an available channel.
            generator: the only source of randomness, on ``x_obs``'s device.
            sampler: ``ddpm`` (ancestral, the paper) or ``ddim``.
            steps: number of network evaluations, in ``[1, T]``; ``None`` = T.
            eta: DDIM stochasticity in [0, 1] (0 = deterministic after the initial noise); ``ddim`` only.
            clip: ``(low, high)`` range for x̂₀ (the data range), or ``None``.
            callback: ``callback(step_index, x)`` after every step, ``x`` the ``(B, M, *S)`` state with the available
                channels put back.

        Returns:
            ``(B, M, *S)``: ``x_obs`` on the available channels, the synthesis on the missing ones.
        """
        self._check_images(x_obs, available, "x_obs")
        if sampler not in ("ddpm", "ddim"):
            raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        if sampler == "ddpm" and eta != 0.0:
            raise ValueError("eta applies to sampler 'ddim' only")
        if clip is not None and not clip[0] < clip[1]:
            raise ValueError(f"clip must be (low, high) with low < high, got {clip}")
        no_input = ~available.any(dim=1)
        if no_input.any():
            raise ValueError(f"rows {no_input.nonzero().flatten().tolist()} have no available channel to condition on")
        schedule = self.inference_timesteps(steps)
        _check_generator(generator, x_obs.device, "sample")

        keep = self._channels(available, x_obs)
        x = torch.where(keep, x_obs, _randn(x_obs.shape, generator, x_obs))
        batch = x_obs.shape[0]
        x0_hat = x
        for i, step in enumerate(schedule):
            t = torch.full((batch,), step, dtype=torch.long, device=x_obs.device)
            prev = schedule[i + 1] if i + 1 < len(schedule) else -1
            t_prev = torch.full_like(t, prev)
            out = fn(x, available, t)
            if out.shape != x.shape:
                raise ValueError(f"the denoiser returned {tuple(out.shape)}, expected {tuple(x.shape)}")
            x0_hat = self.predict_x0(out.to(x.dtype), x, t)
            if clip is not None:
                x0_hat = x0_hat.clamp(clip[0], clip[1])
            if sampler == "ddpm":
                mean, variance = self.posterior(x0_hat, x, t, t_prev=t_prev)
                x_next = mean + variance.sqrt() * _randn(x.shape, generator, x) if prev >= 0 else mean
            else:
                z = _randn(x.shape, generator, x) if eta > 0 and prev >= 0 else None
                x_next = self.ddim_step(x0_hat, x, t, t_prev=t_prev, eta=eta, noise=z)
            x = torch.where(keep, x_obs, x_next)
            if callback is not None:
                callback(i, x)
        return torch.where(keep, x_obs, x0_hat)


@torch.no_grad()
def ema_update(
    ema_model: nn.Module, model: nn.Module, *, decay: float = 0.999, num_updates: int | None = None
) -> float:
    """Move ``ema_model``'s parameters towards ``model``'s in place: ``ema ← decay · ema + (1 − decay) · model``
    (torch's ``get_ema_multi_avg_fn``); buffers are copied. The EMA weights are the ones M2DN samples with (spec §2.5,
    decay 0.999).

    Args:
        ema_model: the averaged copy (e.g. ``copy.deepcopy(model)`` at the start), same architecture.
        model: the trained network.
        decay: in [0, 1]; 0 copies the weights.
        num_updates: ``None`` (default) uses ``decay`` as is. An int switches on warm-up: the decay used is
            ``min(decay, (1 + n) / (10 + n))`` with ``n = num_updates`` (the number of earlier updates), so early
            averages are not dominated by the random initialisation.

    Returns:
        the decay used.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    if num_updates is not None:
        if num_updates < 0:
            raise ValueError(f"num_updates must be non-negative, got {num_updates}")
        decay = min(decay, (1.0 + num_updates) / (10.0 + num_updates))
    ema_params, params = dict(ema_model.named_parameters()), dict(model.named_parameters())
    if ema_params.keys() != params.keys() or any(ema_params[k].shape != params[k].shape for k in params):
        raise ValueError("ema_model and model must have the same parameters (names and shapes)")
    groups: dict[tuple[torch.dtype, torch.device], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for name, p in params.items():
        e = ema_params[name]
        group = groups.setdefault((e.dtype, e.device), ([], []))
        group[0].append(e)
        group[1].append(p.detach().to(dtype=e.dtype, device=e.device))
    average = get_ema_multi_avg_fn(decay)
    for ema_list, model_list in groups.values():
        average(ema_list, model_list, None)
    ema_buffers = dict(ema_model.named_buffers())
    for name, b in model.named_buffers():
        if name in ema_buffers:
            ema_buffers[name].copy_(b)
    return decay
