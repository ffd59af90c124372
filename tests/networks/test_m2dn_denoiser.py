"""M2DN denoiser (IEEE TMI 2024, doc 10444695): ``shared/methods/m2dn.md`` §3 invariants 7 (shapes) and 8 (the
mask matters and is spatially constant), the timestep switch, separate per-modality stems, odd shapes in 2D
and 3D, determinism and clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medmodal.networks.m2dn import M2DNDenoiser, timestep_embedding
from medmodal.networks.registry import create_network, list_networks

MODS = ("t1", "t1c", "t2", "flair")
SHAPES = {2: (21, 23), 3: (17, 18, 19)}
SMALL = dict(width=8, channels=(8, 16), bottleneck_blocks=1, time_dim=32, se_reduction=4, norm_groups=4)
CONDS = ("bottleneck_concat", "input_concat", "film", "none")


def make(dims: int, seed: int = 0, **kw) -> M2DNDenoiser:
    torch.manual_seed(seed)
    return M2DNDenoiser(spatial_dims=dims, modalities=MODS, **{**SMALL, **kw}).eval()


def image(dims: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, len(MODS), *SHAPES[dims], generator=torch.Generator().manual_seed(seed))


def hook_input(module: torch.nn.Module, store: dict, key: str = "in") -> None:
    module.register_forward_hook(lambda _m, args, _out: store.__setitem__(key, args[0].detach().clone()))


def hook_output(module: torch.nn.Module, store: dict, key: str = "out") -> None:
    module.register_forward_hook(lambda _m, _args, out: store.__setitem__(key, out.detach().clone()))


AVAIL = torch.tensor([[True, False, True, False], [False, True, True, True]])


def test_registered_and_tiny_variant() -> None:
    assert {"m2dn_denoiser", "m2dn_denoiser_tiny"} <= set(list_networks())
    net = create_network("m2dn_denoiser_tiny", spatial_dims=2, modalities=MODS)
    assert isinstance(net, M2DNDenoiser) and net.reads_missing_channels
    assert (net.width, net.channels, net.time_dim, net.out_channels) == (8, (8, 16), 32, len(MODS))
    film = create_network("m2dn_denoiser_tiny", spatial_dims=3, modalities=MODS, mask_cond="film",
                          time_embedding=False)
    assert film.mask_cond == "film" and not film.time_embedding


def test_invariant7_default_shapes_at_256() -> None:
    """Defaults, 256² input, M = 4: stem M × (32, 128²), bottleneck concat (128 + M, 16²), (32, 256²) before the
    head, output (B, M, 256²) — the spec §2.3 table."""
    torch.manual_seed(0)
    net = M2DNDenoiser(spatial_dims=2, modalities=MODS).eval()
    assert (net.width, net.channels, net.time_dim) == (32, (64, 128, 128), 128)
    seen: dict = {}
    hook_output(net.stem_block, seen, "stem")
    hook_input(net.bottleneck_in, seen, "concat")
    hook_output(net.bottleneck_in, seen, "bottleneck")
    hook_output(net.final_block, seen, "final")
    with torch.no_grad():
        out = net(torch.randn(1, 4, 256, 256), AVAIL[:1], torch.tensor([10]))
    assert seen["stem"].shape == (1, 4 * 32, 128, 128)
    assert seen["concat"].shape == (1, 128 + 4, 16, 16)
    assert seen["bottleneck"].shape == (1, 128, 16, 16)
    assert seen["final"].shape == (1, 32, 256, 256)
    assert out.shape == (1, 4, 256, 256)


@pytest.mark.parametrize("dims", [2, 3])
def test_invariant7_tiny_recipe_bottleneck(dims: int) -> None:
    """Spec §7 CPU config (width 16, stem + 2 down-samplings): 64² → an 8² bottleneck, concat channels[-1] + M;
    32 → 4."""
    for size, bott in ((64, 8), (32, 4)):
        net = make(dims, width=16, channels=(32, 32), time_dim=64, norm_groups=8)
        seen: dict = {}
        hook_input(net.bottleneck_in, seen)
        with torch.no_grad():
            out = net(torch.randn(2, 4, *([size] * dims)), AVAIL, torch.tensor([3, 70]))
        assert seen["in"].shape == (2, 32 + 4, *([bott] * dims))
        assert out.shape == (2, 4, *([size] * dims))


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("mask_cond", CONDS)
def test_invariant8_mask_matters_except_none(dims: int, mask_cond: str) -> None:
    net = make(dims, mask_cond=mask_cond)
    x, t = image(dims), torch.tensor([7, 40])
    other = torch.tensor([[False, True, True, True], [True, True, False, False]])
    with torch.no_grad():
        a, b = net(x, AVAIL, t), net(x, other, t)
    if mask_cond == "none":
        assert torch.equal(a, b)
    else:
        # Every sample's output changes, not just one.
        assert ((a - b).flatten(1).abs().amax(1) > 1e-4).all(), (a - b).abs().max()


@pytest.mark.parametrize("dims", [2, 3])
def test_invariant8_bottleneck_mask_is_v_constant_over_space(dims: int) -> None:
    net = make(dims)
    seen: dict = {}
    hook_input(net.bottleneck_in, seen)
    with torch.no_grad():
        net(image(dims), AVAIL, torch.tensor([7, 40]))
    mask = seen["in"][:, -len(MODS):]
    v = (~AVAIL).float().reshape(2, 4, *([1] * dims))
    assert torch.equal(mask, v.expand_as(mask))


@pytest.mark.parametrize("dims", [2, 3])
def test_input_concat_puts_the_whole_mask_beside_each_modality(dims: int) -> None:
    net = make(dims, mask_cond="input_concat")
    seen: dict = {}
    hook_input(net.stem_conv, seen)
    x = image(dims)
    with torch.no_grad():
        net(x, AVAIL)
    m = len(MODS)
    groups = seen["in"].unflatten(1, (m, 1 + m))  # (B, M, 1 + M, *S'), padded S'
    crop = (slice(None), slice(None), *(slice(0, s) for s in SHAPES[dims]))
    assert torch.equal(groups[:, :, 0][crop], x)
    v = (~AVAIL).float().reshape(2, 1, m, *([1] * dims))
    assert torch.equal(groups[:, :, 1:], v.expand_as(groups[:, :, 1:]))


@pytest.mark.parametrize("dims", [2, 3])
def test_timestep_matters_only_with_time_embedding(dims: int) -> None:
    x = image(dims)
    on = make(dims)
    with torch.no_grad():
        a, b = on(x, AVAIL, torch.tensor([0, 0])), on(x, AVAIL, torch.tensor([500, 3]))
        none = on(x, AVAIL)
        scalar = on(x, AVAIL, torch.tensor(500.0))
        per_sample = on(x, AVAIL, torch.tensor([500, 500]))
    assert ((a - b).flatten(1).abs().amax(1) > 1e-4).all()
    assert torch.equal(none, a)  # None means step 0
    assert torch.allclose(scalar, per_sample)
    off = make(dims, time_embedding=False)
    assert not any("time" in n for n, _ in off.named_parameters())
    with torch.no_grad():
        assert torch.equal(off(x, AVAIL, torch.tensor([0, 0])), off(x, AVAIL, torch.tensor([500, 3])))
        assert torch.equal(off(x, AVAIL), off(x, AVAIL, torch.tensor([999, 1])))


def test_timestep_embedding_is_ddpm_sinusoidal() -> None:
    t = torch.tensor([0, 1, 250])
    emb = timestep_embedding(t, 8)
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(4) / 3)
    expected = torch.cat([torch.sin(t[:, None] * freqs), torch.cos(t[:, None] * freqs)], 1)
    assert torch.allclose(emb, expected)
    assert timestep_embedding(t, 7).shape == (3, 7) and torch.all(timestep_embedding(t, 7)[:, -1] == 0)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("mask_cond", CONDS)
def test_odd_shapes_and_out_channels(dims: int, mask_cond: str) -> None:
    x = image(dims, batch=3)
    available = torch.tensor([[True, False, False, False], [True, True, True, False], [False, False, True, True]])
    with torch.no_grad():
        assert make(dims, mask_cond=mask_cond)(x, available).shape == (3, 4, *SHAPES[dims])
        assert make(dims, mask_cond=mask_cond, out_channels=2)(x, available).shape == (3, 2, *SHAPES[dims])


@pytest.mark.parametrize("mask_cond", CONDS)
@pytest.mark.parametrize("time_embedding", [True, False])
def test_every_parameter_gets_a_gradient(mask_cond: str, time_embedding: bool) -> None:
    net = make(2, mask_cond=mask_cond, time_embedding=time_embedding).train()
    net(image(2), AVAIL, torch.tensor([3, 90])).square().mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing, missing


@pytest.mark.parametrize("dims", [2, 3])
def test_per_modality_stems_are_separate(dims: int) -> None:
    """Changing modality 0's image changes only modality 0's stem features (a shared stem would mix them)."""
    net = make(dims, mask_cond="none")
    seen: dict = {}
    hook_output(net.stem_block, seen)
    x = image(dims)
    y = x.clone()
    y[:, 0] = torch.randn_like(y[:, 0])
    with torch.no_grad():
        net(x, AVAIL)
        a = seen["out"].unflatten(1, (4, 8))
        net(y, AVAIL)
        b = seen["out"].unflatten(1, (4, 8))
    assert not torch.allclose(a[:, 0], b[:, 0])
    assert torch.equal(a[:, 1:], b[:, 1:])


@pytest.mark.parametrize("dims", [2, 3])
def test_deterministic_and_samples_independent(dims: int) -> None:
    x, t = image(dims), torch.tensor([7, 40])
    net = make(dims)
    with torch.no_grad():
        out = net(x, AVAIL, t)
        assert torch.equal(out, make(dims)(x, AVAIL, t))  # same seed, same network, same output
        single = net(x[1:], AVAIL[1:], t[1:])  # no statistic is shared across the batch
    assert torch.allclose(out[1:], single, atol=1e-5)
    assert not torch.allclose(out, make(dims, seed=1)(x, AVAIL, t))


@pytest.mark.parametrize("dims", [2, 3])
def test_channels_last_input_gives_the_same_output(dims: int) -> None:
    fmt = torch.channels_last if dims == 2 else torch.channels_last_3d
    net, x = make(dims), image(dims)
    with torch.no_grad():
        ref = net(x, AVAIL)
        out = net.to(memory_format=fmt)(x.contiguous(memory_format=fmt), AVAIL)
    assert torch.allclose(ref, out, atol=1e-5)


def test_downsampling_is_the_block_mean() -> None:
    net2, net3 = make(2), make(3)
    x2, x3 = torch.randn(1, 3, 6, 8), torch.randn(1, 3, 4, 6, 8)
    assert torch.allclose(net2._resample(x2, 0.5), F.avg_pool2d(x2, 2), atol=1e-6)
    assert torch.allclose(net3._resample(x3, 0.5), F.avg_pool3d(x3, 2), atol=1e-6)


def test_wrong_inputs_are_clear_errors() -> None:
    net = make(3)
    x = image(3)
    with pytest.raises(ValueError, match=r"expected image \(B, 4"):
        net(x[:, :3], AVAIL[:, :3])
    with pytest.raises(ValueError, match=r"expected image \(B, 4, \*3D\)"):
        net(torch.randn(2, 4, 9, 9), AVAIL)
    with pytest.raises(ValueError, match=r"expected available \(B, M\) = \(2, 4\), got \(2, 3\)"):
        net(x, AVAIL[:, :3])
    with pytest.raises(ValueError, match="available must be a bool tensor"):
        net(x, (~AVAIL).float())
    with pytest.raises(ValueError, match=r"expected timestep \(B,\)"):
        net(x, AVAIL, torch.tensor([1, 2, 3]))


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(spatial_dims=4), "spatial_dims"),
        (dict(mask_cond="bottleneck"), "mask_cond must be one of"),
        (dict(norm_groups=3), "norm_groups=3 must divide"),
        (dict(channels=()), "at least one level"),
        (dict(modalities=("t1", "t1")), "unique"),
        (dict(dropout=1.0), "dropout"),
    ],
)
def test_bad_constructor_arguments_are_clear_errors(kw: dict, match: str) -> None:
    args = dict(spatial_dims=2, modalities=MODS, **SMALL)
    with pytest.raises(ValueError, match=match):
        M2DNDenoiser(**{**args, **kw})
