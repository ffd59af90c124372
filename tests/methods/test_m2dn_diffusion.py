"""The masked-diffusion core of M2DN (IEEE TMI 2024): the spec's invariants (``shared/methods/m2dn.md`` §3)."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from torch import nn

from medmodal.methods.m2dn.diffusion import MaskedDiffusion, ema_update, partial_patterns

T = 50


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _x0(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.rand(shape, generator=_gen(seed)) * 1.8 - 0.9  # inside the clip range [-1, 1]


def _all_available_masks(batch: int, m: int) -> list[torch.Tensor]:
    """Every (B, M) availability with at least one available and one missing channel per row (same per row)."""
    masks = []
    for bits in itertools.product([False, True], repeat=m):
        if any(bits) and not all(bits):
            masks.append(torch.tensor(bits).expand(batch, m).clone())
    return masks


# ---------------------------------------------------------------- invariant 1: clean channels stay clean
def test_q_sample_keeps_available_channels_bit_exact_for_every_t_and_pattern():
    diff = MaskedDiffusion(timesteps=T)
    x0 = _x0((4, 3, 7, 9))
    noise = torch.randn(x0.shape, generator=_gen(1))
    for available in _all_available_masks(4, 3):
        for step in range(T):
            t = torch.full((4,), step)
            xt = diff.q_sample(x0, available, t, noise)
            assert torch.equal(xt[available], x0[available])
            assert not torch.equal(xt[~available], x0[~available])  # the missing ones are diffused


def test_q_sample_mixed_rows_and_3d():
    diff = MaskedDiffusion(timesteps=T, beta_schedule="cosine")
    x0 = _x0((3, 4, 5, 6, 7))
    available = torch.tensor([[True, False, False, True], [False, False, False, True], [True, True, True, False]])
    t = torch.tensor([0, 17, T - 1])
    xt = diff.q_sample(x0, available, t, torch.randn(x0.shape, generator=_gen(2)))
    assert torch.equal(xt[available], x0[available])
    abar = diff.alphas_cumprod[t].float()
    expected = abar.sqrt().view(3, 1, 1, 1, 1) * x0  # noise 0 -> only the scaling remains
    zero = diff.q_sample(x0, available, t, torch.zeros_like(x0))
    assert torch.allclose(zero[~available], expected.expand_as(x0)[~available], atol=1e-6)


# ---------------------------------------------------------------- invariant 2: noise level
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_q_sample_noise_variance_matches_one_minus_alpha_bar(schedule):
    diff = MaskedDiffusion(timesteps=100, beta_schedule=schedule)
    x0 = _x0((64, 3, 24, 24))
    available = torch.tensor([True, False, False]).expand(64, 3)
    for step in (0, 10, 50, 99):
        t = torch.full((64,), step)
        xt = diff.q_sample(x0, available, t, torch.randn(x0.shape, generator=_gen(step)))
        abar = float(diff.alphas_cumprod[step])
        residual = (xt - math.sqrt(abar) * x0)[~available]
        assert abs(residual.var().item() / (1 - abar) - 1) < 0.03


# ---------------------------------------------------------------- invariant 3: mask sampler
@pytest.mark.parametrize("m", [3, 4])
def test_sample_missing_is_uniform_over_partial_patterns(m):
    n = 10_000
    missing = MaskedDiffusion.sample_missing(torch.ones(n, m, dtype=torch.bool), generator=_gen(m))
    assert missing.shape == (n, m) and missing.dtype == torch.bool
    assert missing.any(dim=1).all() and not missing.all(dim=1).any()
    codes = (missing.long() << torch.arange(m)).sum(dim=1)
    counts = torch.bincount(codes, minlength=2**m).double()
    k = 2**m - 2
    p = 1 / k
    sigma = math.sqrt(n * p * (1 - p))
    assert counts[0] == 0 and counts[-1] == 0
    assert ((counts[1:-1] - n * p).abs() <= 3 * sigma).all(), counts


def test_sample_missing_incomplete_rows_keep_absent_channels_missing_and_are_uniform():
    n, m = 10_000, 4
    present = torch.ones(n, m, dtype=torch.bool)
    present[:, 2] = False  # channel 2 truly absent
    missing = MaskedDiffusion.sample_missing(present, generator=_gen(5))
    assert missing[:, 2].all()
    assert not missing.all(dim=1).any()
    codes = (missing.long() << torch.arange(m)).sum(dim=1)
    counts = torch.bincount(codes, minlength=2**m).double()
    allowed = [c for c in range(2**m) if c & 4 and c != 2**m - 1]  # contain channel 2, not all missing
    assert len(allowed) == 7 and 4 in allowed  # "only the absent one missing" is allowed
    assert counts[[c for c in range(2**m) if c not in allowed]].sum() == 0
    p = 1 / len(allowed)
    sigma = math.sqrt(n * p * (1 - p))
    assert ((counts[allowed] - n * p).abs() <= 3 * sigma).all(), counts


def test_sample_missing_single_present_channel_and_errors():
    present = torch.tensor([[False, True, False], [True, True, True]])
    missing = MaskedDiffusion.sample_missing(present, generator=_gen(0))
    assert missing[0].tolist() == [True, False, True]  # the one present channel must stay available
    with pytest.raises(ValueError, match="no present channel"):
        MaskedDiffusion.sample_missing(torch.tensor([[False, False], [True, True]]), generator=_gen(0))
    with pytest.raises(ValueError, match="no partial pattern"):
        MaskedDiffusion.sample_missing(torch.ones(2, 1, dtype=torch.bool), generator=_gen(0))
    with pytest.raises(ValueError, match="bool"):
        MaskedDiffusion.sample_missing(torch.ones(2, 3), generator=_gen(0))
    assert partial_patterns(3).shape == (8, 3) and partial_patterns(3)[5].tolist() == [True, False, True]


def test_sample_timesteps_uniform_range():
    t = MaskedDiffusion(timesteps=T).sample_timesteps(20_000, generator=_gen(3))
    assert t.dtype == torch.long and t.shape == (20_000,)
    assert int(t.min()) == 0 and int(t.max()) == T - 1
    counts = torch.bincount(t, minlength=T).double()
    assert ((counts - 400).abs() <= 4 * math.sqrt(400)).all()


# ---------------------------------------------------------------- invariant 4: re-insertion
def _junk_denoiser(x: torch.Tensor, available: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A deterministic denoiser whose outputs on available channels are far from the inputs."""
    return torch.tanh(3 * x.flip(1) + t.view(-1, *[1] * (x.ndim - 1)) / 7) * 0.8 - 0.1


@pytest.mark.parametrize("shape", [(2, 3, 17, 18), (2, 3, 5, 6, 7)])
@pytest.mark.parametrize(("sampler", "steps", "eta"), [("ddpm", None, 0.0), ("ddpm", 7, 0.0), ("ddim", 9, 0.0),
                                                       ("ddim", 9, 0.5)])
def test_sampler_puts_available_channels_back_after_every_step(shape, sampler, steps, eta):
    diff = MaskedDiffusion(timesteps=T)
    x_obs = _x0(shape)
    available = torch.tensor([[True, False, True], [False, True, False]])
    seen = []

    def callback(i: int, x: torch.Tensor) -> None:
        assert torch.equal(x[available], x_obs[available])
        seen.append(i)

    out = diff.sample(_junk_denoiser, x_obs, available, generator=_gen(0), sampler=sampler, steps=steps, eta=eta,
                      callback=callback)
    assert seen == list(range(steps or T))
    assert out.shape == x_obs.shape
    assert torch.equal(out[available], x_obs[available])
    assert out[~available].abs().max() <= 1.0  # clipped x̂0


def test_sampler_never_feeds_self_reconstructions_back():
    """The denoiser sees x_obs on the available channels at every step, whatever it predicted for them."""
    diff = MaskedDiffusion(timesteps=T)
    x_obs = _x0((2, 3, 8, 9))
    x_obs_nan = x_obs.clone()
    available = torch.tensor([[True, True, False], [False, True, False]])
    x_obs_nan[~available] = float("nan")  # missing inputs are never read

    def fn(x, a, t):
        assert torch.equal(x[a], x_obs[a]) and torch.isfinite(x).all()
        return torch.full_like(x, 0.5)

    out = diff.sample(fn, x_obs_nan, available, generator=_gen(1), sampler="ddim", steps=5)
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------- invariant 5: oracle denoiser
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("sampler", "steps"), [("ddpm", None), ("ddpm", 13), ("ddim", None), ("ddim", 13),
                                                ("ddim", 1)])
def test_oracle_denoiser_recovers_x0(seed, sampler, steps):
    diff = MaskedDiffusion(timesteps=T)
    x0 = _x0((3, 4, 9, 10), seed=seed + 10)
    available = torch.tensor([[True, False, False, True], [False, False, True, False], [True, True, True, False]])
    last = {}

    def oracle(x, a, t):
        return x0.clone()

    out = diff.sample(oracle, x0, available, generator=_gen(seed), sampler=sampler, steps=steps,
                      callback=lambda i, x: last.update(x=x))
    assert torch.equal(out, x0)
    # the sampler's own state reaches x0 at the end too (a wrong posterior or DDIM update would not)
    assert torch.allclose(last["x"], x0, atol=1e-5)


def test_oracle_ddim_eta0_keeps_the_initial_noise_direction():
    """DDIM(η=0) with the true x0 keeps the noise direction ε̂ of the start: x_s = √ᾱ_s x0 + √(1−ᾱ_s) ε̂ on the
    missing channels at every step, ε̂ = (x_T − √ᾱ_T x0) / √(1−ᾱ_T) with x_T the N(0, I) start."""
    diff = MaskedDiffusion(timesteps=T)
    x0 = _x0((2, 3, 11, 12))
    available = torch.tensor([[True, False, False], [False, True, True]])
    schedule = diff.inference_timesteps(8)
    abar = diff.alphas_cumprod
    start = torch.randn(x0.shape, generator=_gen(4))  # the sampler's first draw
    a_start = float(abar[schedule[0]])
    eps = (start - math.sqrt(a_start) * x0) / math.sqrt(1 - a_start)

    def check(i, x):
        nxt = schedule[i + 1] if i + 1 < len(schedule) else -1
        a = float(abar[nxt]) if nxt >= 0 else 1.0
        expected = math.sqrt(a) * x0 + math.sqrt(1 - a) * eps
        assert torch.allclose(x[~available], expected[~available], atol=1e-5)

    diff.sample(lambda x, a, t: x0, x0, available, generator=_gen(4), sampler="ddim", steps=8, callback=check)


@pytest.mark.parametrize("steps", [None, 10])
def test_oracle_ddpm_posterior_samples_have_the_forward_marginal(steps):
    """q(x_s | x_t, x0) composed with q(x_t | x0) is q(x_s | x0): the variance of x_s − √ᾱ_s x0 is 1 − ᾱ_s.

    The β range is scaled by 1000 / T so that ᾱ_T ≈ 5e-5 and the N(0, I) start is the forward marginal."""
    diff = MaskedDiffusion(timesteps=T, beta_start=1e-4 * 1000 / T, beta_end=2e-2 * 1000 / T)
    assert diff.alphas_cumprod[-1] < 1e-4
    x0 = _x0((32, 2, 24, 24))
    available = torch.tensor([True, False]).expand(32, 2)
    schedule = diff.inference_timesteps(steps)
    abar = diff.alphas_cumprod
    ratios = []

    def check(i, x):
        nxt = schedule[i + 1] if i + 1 < len(schedule) else -1
        if nxt >= 0 and i % 3 == 1:
            a = float(abar[nxt])
            ratios.append(((x - math.sqrt(a) * x0)[~available].var() / (1 - a)).item())

    diff.sample(lambda x, a, t: x0, x0, available, generator=_gen(6), steps=steps, clip=None, callback=check)
    assert ratios and all(abs(r - 1) < 0.05 for r in ratios), ratios


def test_oracle_eps_objective_recovers_x0():
    diff = MaskedDiffusion(timesteps=T, objective="pred_eps")
    x0 = _x0((2, 3, 8, 9))
    available = torch.tensor([[True, False, True], [False, False, True]])

    def oracle_eps(x, a, t):
        abar = diff.alphas_cumprod[t].float().view(-1, 1, 1, 1)
        return (x - abar.sqrt() * x0) / (1 - abar).sqrt()

    out = diff.sample(oracle_eps, x0, available, generator=_gen(0), sampler="ddim", steps=6)
    assert torch.allclose(out, x0, atol=1e-4)
    assert torch.equal(out[available], x0[available])


# ---------------------------------------------------------------- invariant 6: posterior
def test_posterior_at_first_index_is_x0_hat_with_zero_variance():
    diff = MaskedDiffusion(timesteps=T)
    x0_hat, xt = _x0((2, 3, 5, 6), seed=1), _x0((2, 3, 5, 6), seed=2)
    mean, var = diff.posterior(x0_hat, xt, torch.zeros(2, dtype=torch.long))
    assert torch.equal(mean, x0_hat)
    assert torch.equal(var, torch.zeros_like(var))


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_posterior_equals_spec_formula_and_monai_ddpm(schedule):
    diff = MaskedDiffusion(timesteps=T, beta_schedule=schedule)
    monai_schedule = {"linear": "linear_beta", "cosine": "cosine"}[schedule]
    monai = DDPMScheduler(num_train_timesteps=T, schedule=monai_schedule, prediction_type="sample",
                          clip_sample=False)
    assert torch.allclose(diff.betas, monai.betas.double())
    # MONAI's tables are float32; rebuild them in float64 from its own β so the formulas are compared, not rounding
    monai.betas = monai.betas.double()
    monai.alphas = 1 - monai.betas
    monai.alphas_cumprod = torch.cumprod(monai.alphas, dim=0)
    monai.one = torch.tensor(1.0, dtype=torch.float64)
    beta, abar = diff.betas, diff.alphas_cumprod
    x0_hat, xt = _x0((1, 3, 6, 7), seed=3).double(), torch.randn(1, 3, 6, 7, generator=_gen(4), dtype=torch.float64)
    for step in (1, 7, 30, T - 1):
        mean, var = diff.posterior(x0_hat, xt, torch.tensor([step]))
        a_t, a_prev, alpha = abar[step], abar[step - 1], 1 - beta[step]
        spec_mean = (a_prev.sqrt() * beta[step] / (1 - a_t)) * x0_hat.double() + (
            alpha.sqrt() * (1 - a_prev) / (1 - a_t)) * xt.double()
        spec_var = beta[step] * (1 - a_prev) / (1 - a_t)
        assert torch.allclose(mean, spec_mean, rtol=1e-12, atol=1e-12)
        assert math.isclose(var.item(), spec_var.item(), rel_tol=1e-12)
        assert torch.allclose(mean, monai._get_mean(step, x0_hat, xt), rtol=1e-12, atol=1e-12)
        assert math.isclose(var.item(), monai._get_variance(step).item(), rel_tol=1e-12)
        # MONAI's whole DDPM step with the same generator draws the same noise
        prev, _ = monai.step(x0_hat, step, xt, generator=_gen(step))
        ours = mean + var.sqrt() * torch.randn(xt.shape, generator=_gen(step), dtype=torch.float64)
        assert torch.allclose(ours, prev, rtol=1e-12, atol=1e-12)
    # in float32 the same within MONAI's float32 rounding
    mean32, _ = diff.posterior(x0_hat.float(), xt.float(), torch.tensor([7]))
    assert mean32.dtype == torch.float32 and torch.allclose(mean32.double(), monai._get_mean(7, x0_hat, xt), atol=1e-6)


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_step_equals_monai_where_its_stride_is_consistent(eta):
    steps = 10
    diff = MaskedDiffusion(timesteps=T)
    monai = DDIMScheduler(num_train_timesteps=T, prediction_type="sample", clip_sample=False)
    monai.set_timesteps(steps)
    x0_hat, xt = _x0((2, 3, 6, 7), seed=5), torch.randn(2, 3, 6, 7, generator=_gen(6))
    stride = T // steps
    for step in (T - 1, 23, stride - 1):  # the last one steps to the clean image (ᾱ = 1)
        expected, _ = monai.step(x0_hat, step, xt, eta=eta, generator=_gen(step))
        t = torch.full((2,), step)
        z = torch.randn(xt.shape, generator=_gen(step))
        ours = diff.ddim_step(x0_hat, xt, t, t_prev=t - stride, eta=eta, noise=z)
        assert torch.allclose(ours, expected, atol=1e-5)


def test_respaced_ddpm_equals_ddim_with_eta_one():
    diff = MaskedDiffusion(timesteps=T)
    x_obs = _x0((2, 3, 8, 9))
    available = torch.tensor([[True, False, True], [False, True, False]])
    ddpm = diff.sample(_junk_denoiser, x_obs, available, generator=_gen(3), sampler="ddpm", steps=11)
    ddim = diff.sample(_junk_denoiser, x_obs, available, generator=_gen(3), sampler="ddim", steps=11, eta=1.0)
    assert torch.allclose(ddpm, ddim, atol=1e-5)
    ddim0 = diff.sample(_junk_denoiser, x_obs, available, generator=_gen(3), sampler="ddim", steps=11)
    assert not torch.allclose(ddpm, ddim0, atol=1e-3)


def test_predict_x0_inverts_q_sample_for_eps_objective():
    diff = MaskedDiffusion(timesteps=T, objective="pred_eps")
    x0 = _x0((3, 2, 5, 6))
    eps = torch.randn(x0.shape, generator=_gen(7))
    t = torch.tensor([0, 20, T - 1])
    none = torch.zeros(3, 2, dtype=torch.bool)
    xt = diff.q_sample(x0, none, t, eps)
    assert torch.allclose(diff.predict_x0(eps, xt, t), x0, atol=1e-4)
    assert MaskedDiffusion(timesteps=T).predict_x0(eps, xt, t) is eps


# ---------------------------------------------------------------- invariant 9: loss channels
def _loss_grad(loss_channels: str, x0: torch.Tensor, missing, present, objective="pred_x0", noise=None):
    diff = MaskedDiffusion(timesteps=T, objective=objective)
    pred = torch.zeros_like(x0).requires_grad_(True)
    loss = diff.loss(pred, x0, missing=missing, present=present, loss_channels=loss_channels, noise=noise)
    loss.backward()
    return loss, pred.grad


def test_loss_missing_gives_zero_gradient_on_available_and_all_does_not():
    x0 = _x0((3, 4, 6, 7)) + 2.0  # nowhere zero, so every counted element has a gradient
    present = torch.tensor([[True, True, True, True], [True, False, True, True], [True, True, False, True]])
    missing = torch.tensor([[True, False, False, True], [False, True, True, False], [True, False, True, False]])
    x0[~present] = float("nan")  # absent channels hold no data
    available = present & ~missing
    for mode in ("missing", "all"):
        loss, grad = _loss_grad(mode, x0, missing, present)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert (grad[~present] == 0).all()  # truly absent: never counted
        assert (grad[missing & present] != 0).all()
        if mode == "missing":
            assert (grad[available] == 0).all()
        else:
            assert (grad[available] != 0).all()


def test_loss_values_and_normalisation():
    x0, pred = _x0((2, 3, 5, 6), seed=1), _x0((2, 3, 5, 6), seed=2)
    diff = MaskedDiffusion(timesteps=T)
    present = torch.ones(2, 3, dtype=torch.bool)
    missing = torch.tensor([[True, False, False], [True, True, False]])
    full = diff.loss(pred, x0, missing=missing, present=present, loss_channels="all")
    assert torch.allclose(full, F.mse_loss(pred, x0))  # spec §2.2: mean over all channels and pixels
    only = diff.loss(pred, x0, missing=missing, present=present, loss_channels="missing")
    assert torch.allclose(only, F.mse_loss(pred[missing], x0[missing]))
    none = diff.loss(pred, x0, missing=torch.zeros_like(missing), present=present, loss_channels="missing")
    assert none.item() == 0.0


def test_loss_eps_objective_targets_noise_on_missing_channels_only():
    x0 = _x0((2, 3, 5, 6))
    noise = torch.randn(x0.shape, generator=_gen(8))
    present = torch.ones(2, 3, dtype=torch.bool)
    missing = torch.tensor([[True, False, False], [False, True, True]])
    loss, grad = _loss_grad("missing", x0, missing, present, objective="pred_eps", noise=noise)
    assert torch.allclose(loss, noise[missing].square().mean())
    assert (grad[~missing] == 0).all()
    with pytest.raises(ValueError, match="loss_channels 'missing'"):
        _loss_grad("all", x0, missing, present, objective="pred_eps", noise=noise)
    with pytest.raises(ValueError, match="needs noise"):
        _loss_grad("missing", x0, missing, present, objective="pred_eps")


# ---------------------------------------------------------------- invariant 10: determinism
def test_sampling_is_deterministic_per_generator_and_ignores_global_rng():
    diff = MaskedDiffusion(timesteps=T)
    x_obs = _x0((2, 3, 7, 8))
    available = torch.tensor([[True, False, False], [False, True, True]])

    def run(seed: int, sampler: str, global_seed: int) -> torch.Tensor:
        torch.manual_seed(global_seed)
        state = torch.get_rng_state()
        out = diff.sample(_junk_denoiser, x_obs, available, generator=_gen(seed), sampler=sampler, steps=6,
                          eta=0.3 if sampler == "ddim" else 0.0)
        assert torch.equal(torch.get_rng_state(), state)
        return out

    for sampler in ("ddpm", "ddim"):
        a, b, c = run(0, sampler, 1), run(0, sampler, 2), run(1, sampler, 1)
        assert torch.equal(a, b)
        assert not torch.allclose(a[~available], c[~available])


def test_mask_and_timestep_samplers_ignore_global_rng():
    diff = MaskedDiffusion(timesteps=T)
    present = torch.ones(64, 4, dtype=torch.bool)
    outs = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        state = torch.get_rng_state()
        outs.append((diff.sample_missing(present, generator=_gen(9)), diff.sample_timesteps(64, generator=_gen(9))))
        assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    other = diff.sample_missing(present, generator=_gen(10))
    assert not torch.equal(other, outs[0][0])


# ---------------------------------------------------------------- schedules and arguments
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_schedules_are_monotone_inside_the_unit_interval(schedule):
    for timesteps in (10, 100, 1000):
        abar = MaskedDiffusion(timesteps=timesteps, beta_schedule=schedule).alphas_cumprod
        assert abar.dtype == torch.float64 and abar.shape == (timesteps,)
        assert (abar > 0).all() and (abar < 1).all()
        assert (abar[1:] < abar[:-1]).all()
    linear = MaskedDiffusion(timesteps=1000).betas
    assert math.isclose(linear[0].item(), 1e-4, rel_tol=1e-5) and math.isclose(linear[-1].item(), 2e-2, rel_tol=1e-5)


def test_inference_timesteps_grid():
    diff = MaskedDiffusion(timesteps=100)
    assert diff.inference_timesteps() == list(range(99, -1, -1))
    for steps in (1, 2, 7, 10, 99, 100):
        grid = diff.inference_timesteps(steps)
        assert len(grid) == steps and grid[0] == 99 and all(a > b for a, b in itertools.pairwise(grid))
        assert grid[-1] == (0 if steps > 1 else 99)
    monai = DDIMScheduler(num_train_timesteps=100)
    monai.set_timesteps(7)
    assert diff.inference_timesteps(7) == monai.timesteps.tolist()


def test_bad_arguments_are_clear_value_errors():
    diff = MaskedDiffusion(timesteps=T)
    x_obs = _x0((2, 3, 5, 6))
    available = torch.tensor([[True, False, False], [False, True, True]])

    def run(**kw):
        kw.setdefault("generator", _gen(0))
        return diff.sample(_junk_denoiser, x_obs, kw.pop("available", available), **kw)

    with pytest.raises(ValueError, match="steps must be an integer in"):
        run(steps=T + 1)
    with pytest.raises(ValueError, match="steps must be an integer in"):
        run(steps=0)
    with pytest.raises(ValueError, match="sampler must be"):
        run(sampler="euler")
    with pytest.raises(ValueError, match="eta applies to sampler 'ddim'"):
        run(sampler="ddpm", eta=0.5)
    with pytest.raises(ValueError, match="eta must be in"):
        run(sampler="ddim", eta=1.5)
    with pytest.raises(ValueError, match="no available channel"):
        run(available=torch.tensor([[False, False, False], [True, False, False]]))
    with pytest.raises(ValueError, match="torch.Generator"):
        run(generator=None)
    with pytest.raises(ValueError, match="clip"):
        run(clip=(1.0, -1.0))
    with pytest.raises(ValueError, match="beta_schedule"):
        MaskedDiffusion(beta_schedule="quadratic")
    with pytest.raises(ValueError, match="objective"):
        MaskedDiffusion(objective="v")
    with pytest.raises(ValueError, match=r"\[0, 50\)"):
        diff.q_sample(x_obs, available, torch.tensor([0, T]), torch.zeros_like(x_obs))
    with pytest.raises(ValueError, match="bool"):
        diff.q_sample(x_obs, available.float(), torch.tensor([0, 1]), torch.zeros_like(x_obs))


# ---------------------------------------------------------------- EMA
def test_ema_update_values_warmup_and_buffers():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model[1].running_mean.fill_(0.25)
    before = [p.clone() for p in ema.parameters()]
    used = ema_update(ema, model, decay=0.9)
    assert used == 0.9
    for e, b, p in zip(ema.parameters(), before, model.parameters(), strict=True):
        assert torch.allclose(e, 0.9 * b + 0.1 * p)
        assert e.grad_fn is None
    assert torch.equal(ema[1].running_mean, model[1].running_mean)
    assert ema_update(ema, model, decay=0.999, num_updates=0) == pytest.approx(0.1)
    assert ema_update(ema, model, decay=0.999, num_updates=10**6) == 0.999
    with pytest.raises(ValueError, match="same parameters"):
        ema_update(nn.Linear(3, 5), nn.Linear(3, 4))
    with pytest.raises(ValueError, match="decay"):
        ema_update(ema, model, decay=1.5)


def test_sample_missing_max_missing_limits_the_hidden_contrasts_uniformly() -> None:
    """The curriculum's limit: with ``max_missing=1`` every draw hides exactly one present contrast, each of the M
    equally often; absent channels are missing on top and do not count; ``None`` keeps the full distribution."""
    gen = torch.Generator().manual_seed(0)
    present = torch.ones(8000, 4, dtype=torch.bool)
    missing = MaskedDiffusion.sample_missing(present, generator=gen, max_missing=1)
    assert bool((missing.sum(1) == 1).all())
    freq = missing.float().mean(0)
    assert torch.allclose(freq, torch.full((4,), 0.25), atol=3 * (0.25 * 0.75 / 8000) ** 0.5)
    two = MaskedDiffusion.sample_missing(present, generator=gen, max_missing=2)
    assert set(two.sum(1).tolist()) == {1, 2}  # 4 one-hidden + 6 two-hidden patterns, uniform: 40 % / 60 %
    assert abs(float((two.sum(1) == 2).float().mean()) - 0.6) < 0.03
    assert set(MaskedDiffusion.sample_missing(present, generator=gen).sum(1).tolist()) == {1, 2, 3}
    incomplete = torch.tensor([[True, True, False, True]] * 2000)
    m = MaskedDiffusion.sample_missing(incomplete, generator=gen, max_missing=1)
    assert bool(m[:, 2].all()) and bool(((m & incomplete).sum(1) <= 1).all())
    with pytest.raises(ValueError, match="max_missing"):
        MaskedDiffusion.sample_missing(present, generator=gen, max_missing=0)
