from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from medmodal.transforms.views import (
    GEOMETRIC_OPS,
    OPS,
    OpDraw,
    ViewParams,
    Views,
    apply_op,
    equalize,
    flip_crop,
    op_value,
    rotate,
    shear,
    strong_views,
    translate,
    weak_views,
)


def _rand(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _from_levels(levels: np.ndarray) -> torch.Tensor:
    """8-bit grey levels (X, Y) -> a (1, X, Y) image in [-1, 1]."""
    return torch.from_numpy(levels.astype(np.float64) / 255.0 * 2 - 1)[None]


def _to_levels(image: torch.Tensor) -> np.ndarray:
    return torch.round((image[0] + 1) / 2 * 255).to(torch.int64).numpy()


def _only(op: str, magnitude: int, sign: int = 1, shape: tuple[int, ...] = (17, 19)) -> ViewParams:
    return ViewParams(spatial_shape=shape, ops=(OpDraw(op, magnitude, sign, True),))


def _marker(shape: tuple[int, ...], at: tuple[int, ...]) -> torch.Tensor:
    x = -torch.ones(1, *shape)
    x[(0, *at)] = 1.0
    return x


def _bright(image: torch.Tensor) -> list[list[int]]:
    return (image[0] > 0).nonzero().tolist()


# --- sampling ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(17, 18), (17, 18, 19)])
def test_same_seed_same_view_other_seed_other_view(shape: tuple[int, ...]) -> None:
    views = strong_views(spatial_dims=len(shape), size=shape)
    x = _rand((2, *shape))
    a, pa = views(x, torch.Generator().manual_seed(7))
    b, pb = views(x, torch.Generator().manual_seed(7))
    assert pa == pb and torch.equal(a, b)
    others = [views(x, torch.Generator().manual_seed(s)) for s in range(8, 14)]
    assert all(p != pa for _, p in others)
    assert sum(not torch.equal(o, a) for o, _ in others) >= 5


def test_apply_is_a_pure_function() -> None:
    views = Views(spatial_dims=2, pad=3, n_ops=2, op_prob=1.0)
    x = _rand((1, 17, 18))
    keep = x.clone()
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        params = views.sample(g, x.shape[1:])
        one, two = views.apply(x, params), views.apply(x, params)
        assert torch.equal(one, two)
        assert torch.equal(x, keep)


def test_two_ops_drawn_from_the_pool_with_the_released_distribution() -> None:
    views = strong_views(spatial_dims=2, size=64)
    g = torch.Generator().manual_seed(1)
    drawn = [views.sample(g, (64, 64)) for _ in range(2000)]
    assert all(len(p.ops) == 2 for p in drawn)
    ops = [op for p in drawn for op in p.ops]
    assert {op.name for op in ops} == set(OPS)
    assert {op.magnitude for op in ops} == set(range(1, 10))
    assert all(op.sign in (-1, 1) for op in ops)
    assert all(op.sign == 1 for op in ops if op.name not in GEOMETRIC_OPS)
    assert {op.sign for op in ops if op.name in GEOMETRIC_OPS} == {-1, 1}
    applied = np.mean([op.applied for op in ops])
    assert abs(applied - 0.5) < 0.03  # 4000 coins: 3 sigma = 0.024
    flipped = np.mean([p.flip_axes == (0,) for p in drawn])
    assert abs(flipped - 0.5) < 0.04
    assert {p.crop_offsets[0] for p in drawn} == set(range(0, 3))  # pad 1 -> offsets 0..2
    # the weak view draws no op
    assert weak_views(spatial_dims=2, size=64).sample(g, (64, 64)).ops == ()


def test_factories_scale_the_padding_with_the_size() -> None:
    assert weak_views(spatial_dims=2, size=256).pad == (32, 32)
    assert weak_views(spatial_dims=2, size=64).pad == (8, 8)
    assert strong_views(spatial_dims=2, size=256).pad == (4, 4)
    assert strong_views(spatial_dims=2, size=64).pad == (1, 1)
    assert strong_views(spatial_dims=3, size=(17, 18, 100)).pad == (1, 1, 2)
    assert weak_views(spatial_dims=3, size=(17, 18, 19)).pad == (2, 2, 2)
    strong = strong_views(spatial_dims=2, size=256)
    assert (strong.n_ops, strong.op_prob, strong.magnitude_range, strong.ops) == (2, 0.5, (1, 9), OPS)
    assert weak_views(spatial_dims=2, size=256).n_ops == 0
    assert "2 ops of all 13 ops" in strong.describe()


def test_params_describe_and_dict() -> None:
    params = ViewParams(spatial_shape=(40, 50), flip_axes=(0,), pad=(4, 4), crop_offsets=(7, 2),
                        ops=(OpDraw("rotate", 5, -1, True), OpDraw("translate_y", 5, 1, False)))
    assert params.describe() == "flip 0; shift (+3, -2); rotate m=5 -15° | translate_y m=5 +7 vox (skipped)"
    d = params.to_dict()
    assert d["ops"][0] == {"name": "rotate", "magnitude": 5, "sign": -1, "applied": True}
    assert ViewParams(**{**d, "ops": [tuple(o.values()) for o in d["ops"]]}) == params


# --- flip and crop -----------------------------------------------------------------------------------------------


def test_identity_settings_and_identity_op_are_exact() -> None:
    x = _rand((2, 17, 18))
    views = Views(spatial_dims=2, pad=0, flip_prob=0.0)
    out, params = views(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, x) and params.flip_axes == () and params.ops == ()
    assert torch.equal(views.apply(x, _only("identity", 5, shape=(17, 18))), x)
    skipped = ViewParams(spatial_shape=(17, 18), ops=(OpDraw("solarize", 9, 1, False), OpDraw("rotate", 9, 1, False)))
    assert torch.equal(views.apply(x, skipped), x)  # ops whose coin said no are not applied
    assert not torch.equal(views.apply(x, ViewParams(spatial_shape=(17, 18), ops=(OpDraw("solarize", 9, 1, True),))), x)


def test_flip_twice_is_identity_and_flip_mirrors_axis_0() -> None:
    x = _marker((17, 18), (3, 5))
    views = Views(spatial_dims=2, pad=2)
    flip = ViewParams(spatial_shape=(17, 18), flip_axes=(0,), pad=(2, 2), crop_offsets=(2, 2))
    once = views.apply(x, flip)
    assert _bright(once) == [[13, 5]]  # x -> 16 - x
    assert torch.equal(views.apply(once, flip), x)


def test_crop_at_offset_pad_is_identity_and_shifts_otherwise() -> None:
    x = _rand((1, 17, 18, 19))
    views = Views(spatial_dims=3, pad=(2, 3, 4))
    assert torch.equal(views.apply(x, ViewParams(spatial_shape=(17, 18, 19), pad=(2, 3, 4), crop_offsets=(2, 3, 4))), x)
    shifted = views.apply(x, ViewParams(spatial_shape=(17, 18, 19), pad=(2, 3, 4), crop_offsets=(0, 3, 5)))
    # offset 0 on axis 0: out[i] = padded[i] = in[i - 2]; offset 5 on axis 2: out[k] = in[k + 1]
    assert torch.equal(shifted[:, 2:, :, :-1], x[:, :-2, :, 1:])
    assert torch.equal(shifted[:, 0, :, :-1], x[:, 2, :, 1:])  # reflect: in[-2] = in[2], in[-1] = in[1]
    assert torch.equal(shifted[:, 1, :, :-1], x[:, 1, :, 1:])
    assert torch.equal(shifted[:, 2:, :, -1], x[:, :-2, :, 17])  # in[19] = in[17]


@pytest.mark.parametrize(("mode", "expected"), [("reflect", [2, 1, 0, 1, 2]), ("symmetric", [1, 0, 0, 1, 2]),
                                                ("edge", [0, 0, 0, 1, 2])])
def test_pad_modes_on_a_ramp(mode: str, expected: list[int]) -> None:
    ramp = torch.arange(5.0).reshape(1, 5, 1)
    out = flip_crop(ramp, pad=(2, 0), offsets=(0, 0), pad_mode=mode)
    assert out[0, :, 0].tolist() == expected
    # any pad and offset, also a pad larger than the image, matches numpy's padding of the same name
    line = torch.arange(5.0).reshape(1, 5, 1)
    for pad in (1, 4, 8, 13):
        padded = np.pad(np.arange(5.0), pad, mode=mode)
        for offset in range(2 * pad + 1):
            out = flip_crop(line, pad=(pad, 0), offsets=(offset, 0), pad_mode=mode)
            assert out[0, :, 0].tolist() == padded[offset:offset + 5].tolist(), (pad, offset)


# --- geometric ops -----------------------------------------------------------------------------------------------


def test_rotate_zero_is_identity_and_90_degrees_moves_a_marker() -> None:
    x = _marker((17, 19), (12, 9))  # 4 voxels right of the centre (8, 9)
    views = Views(spatial_dims=2)
    assert torch.equal(views.apply(x, _only("rotate", 0)), x)
    assert _bright(rotate(x, 90.0)) == [[8, 5]]  # counter-clockwise on the picture (Y down): above the centre
    assert _bright(rotate(x, -90.0)) == [[8, 13]]
    assert torch.allclose(rotate(x, 90.0).max(), torch.tensor(1.0), atol=1e-5)
    # magnitude 5 with sign -1 is -15 degrees: the marker goes below-right, by 4 (cos, sin) voxels
    out = views.apply(x, _only("rotate", 5, -1))
    centroid = ((out[0] + 1).nonzero().float() * (out[0] + 1)[(out[0] + 1) > 0][:, None]).sum(0) / (out[0] + 1).sum()
    assert torch.allclose(centroid, torch.tensor([8 + 4 * np.cos(np.pi / 12), 9 + 4 * np.sin(np.pi / 12)]).float(),
                          atol=0.05)


@pytest.mark.parametrize(("op", "sign", "expected"), [("translate_x", 1, [18, 9]), ("translate_x", -1, [6, 9]),
                                                      ("translate_y", 1, [12, 15]), ("translate_y", -1, [12, 3])])
def test_translate_moves_a_marker_by_the_mapped_voxels(op: str, sign: int, expected: list[int]) -> None:
    shape = (40, 41)
    x = _marker(shape, (12, 9))
    # magnitude 5: floor(0.15 * 40) = 6 voxels along X, floor(0.15 * 41) = 6 along Y
    assert op_value(op, 5, sign, shape) == 6 * sign
    out = Views(spatial_dims=2).apply(x, _only(op, 5, sign, shape))
    assert _bright(out) == [expected]
    assert torch.allclose(out.max(), torch.tensor(1.0), atol=1e-5)
    assert torch.allclose(out.sum(), x.sum(), atol=1e-4)  # the rest stays black (fill -1)
    axis = 0 if op == "translate_x" else 1
    assert torch.equal(out, translate(x, 6 * sign, axis=axis))


def test_shear_is_about_the_centre() -> None:
    x = _marker((17, 19), (8, 13))  # 4 below the centre row (c_y = 9)
    assert _bright(shear(x, 0.25, axis=0)) == [[7, 13]]  # out(x, y) = in(x + k (y - c_y), y)
    y = _marker((17, 19), (12, 9))  # 4 right of the centre column (c_x = 8)
    assert _bright(shear(y, 0.25, axis=1)) == [[12, 8]]
    assert torch.equal(shear(x, 0.0, axis=0), x)


def test_3d_geometric_ops_act_in_the_xy_plane_on_every_slice() -> None:
    slice2d = _rand((1, 17, 18), seed=3)
    volume = slice2d[..., None].expand(1, 17, 18, 19).clone()
    for op in ("rotate", "shear_x", "translate_y"):
        out3, _ = apply_op(volume, OpDraw(op, 7, -1, True))
        out2, _ = apply_op(slice2d, OpDraw(op, 7, -1, True))
        assert torch.allclose(out3, out2[..., None].expand_as(out3), atol=1e-5)


# --- intensity ops on known values -------------------------------------------------------------------------------


def test_op_value_table() -> None:
    m = range(1, 10)
    assert [op_value("posterize", k) for k in m] == [4, 4, 5, 5, 6, 6, 6, 7, 7]
    assert [op_value("solarize", k) for k in m] == [231, 205, 180, 154, 128, 103, 77, 52, 26]
    assert [op_value("rotate", k, -1) for k in m] == [-3 * k for k in m]
    assert np.allclose([op_value("shear_x", k, -1) for k in m], [-0.03 * k for k in m])
    assert np.allclose([op_value("contrast", k) for k in m], [0.05 + 0.09 * k for k in m])
    assert [op_value("translate_x", k, 1, (256, 17)) for k in m] == [int(0.03 * k * 256 + 1e-9) for k in m]
    assert op_value("translate_y", 9, -1, (256, 17)) == -4  # floor(0.27 * 17)
    assert op_value("equalize", 5) is None


RAMP = np.arange(256).reshape(16, 16)  # every grey level once


def test_solarize_and_posterize_on_a_ramp() -> None:
    x = _from_levels(RAMP)
    views = Views(spatial_dims=2)
    solar = _to_levels(views.apply(x, _only("solarize", 5, shape=(16, 16))))  # threshold 128
    assert np.array_equal(solar, np.where(RAMP >= 128, 255 - RAMP, RAMP))
    poster = _to_levels(views.apply(x, _only("posterize", 1, shape=(16, 16))))  # 4 bits
    assert np.array_equal(poster, RAMP // 16 * 16)
    poster = _to_levels(views.apply(x, _only("posterize", 9, shape=(16, 16))))  # 7 bits
    assert np.array_equal(poster, RAMP // 2 * 2)


def test_auto_contrast_stretches_a_ramp_and_keeps_a_constant() -> None:
    levels = 64 + RAMP // 2  # 64..191
    out = Views(spatial_dims=2).apply(_from_levels(levels), _only("auto_contrast", 1, shape=(16, 16)))
    assert torch.allclose(out[0], torch.from_numpy((levels - 64) / 127 * 2 - 1).float().to(out.dtype), atol=1e-6)
    const = torch.full((1, 5, 6), 0.3)
    assert torch.equal(apply_op(const, OpDraw("auto_contrast", 1, 1, True))[0], const)


def test_equalize_known_lut_and_pil() -> None:
    # 16 levels k*17, each 64 times in 32x32: step = (1024 - 64) // 255 = 3, level k -> (1 + 64 k) // 3, <= 255
    levels = (np.repeat(np.arange(16), 64) * 17).reshape(32, 32)
    out = _to_levels(equalize(_from_levels(levels)))
    k = levels // 17
    assert np.array_equal(out, np.minimum((1 + 64 * k) // 3, 255))
    rng = np.random.default_rng(0)
    for shape in [(17, 18), (40, 33)]:
        noisy = np.clip(rng.normal(100, 40, shape), 0, 255).astype(np.uint8)
        pil = np.asarray(ImageOps.equalize(Image.fromarray(noisy.T))).T  # PIL is (rows, cols) = (Y, X)
        assert np.array_equal(_to_levels(equalize(_from_levels(noisy))), pil)
    assert torch.equal(equalize(_from_levels(RAMP)), _from_levels(RAMP))  # one voxel per level: step 1, identity


@pytest.mark.parametrize("op", ["brightness", "contrast", "sharpness", "solarize", "posterize", "auto_contrast"])
def test_intensity_ops_match_pil_within_one_grey_level(op: str) -> None:
    rng = np.random.default_rng(1)
    levels = np.clip(rng.normal(120, 50, (17, 18)), 20, 230).astype(np.uint8)
    pil_image = Image.fromarray(levels.T)
    m = 5
    value = op_value(op, m)
    pil = {
        "brightness": lambda: ImageEnhance.Brightness(pil_image).enhance(value),
        "contrast": lambda: ImageEnhance.Contrast(pil_image).enhance(value),
        "sharpness": lambda: ImageEnhance.Sharpness(pil_image).enhance(value),
        "solarize": lambda: ImageOps.solarize(pil_image, value),
        "posterize": lambda: ImageOps.posterize(pil_image, value),
        "auto_contrast": lambda: ImageOps.autocontrast(pil_image),
    }[op]()
    ours = _to_levels(apply_op(_from_levels(levels), OpDraw(op, m, 1, True))[0])
    diff = np.abs(ours.astype(int) - np.asarray(pil).T.astype(int))
    assert diff.max() <= 1, (op, diff.max())
    assert (ours != levels).mean() > 0.3  # the op did something


# --- masks, shapes, ranges ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(31, 33), (17, 18, 19)])
def test_mask_follows_the_image(shape: tuple[int, ...]) -> None:
    d = len(shape)
    image = -torch.ones(1, *shape)
    box = (slice(None),) + tuple(slice(s // 2 - 4, s // 2 + 3) for s in shape)
    image[box] = 1.0
    mask = (image[0] > 0).to(torch.int64)
    geometric = Views(spatial_dims=d, pad=3, n_ops=2, op_prob=1.0, ops=sorted(GEOMETRIC_OPS),
                      interpolation="nearest")
    g = torch.Generator().manual_seed(0)
    moved = 0
    for _ in range(12):
        out, params, m = geometric(image, g, mask)
        assert m.dtype == torch.int64 and m.shape == shape
        assert torch.equal((out[0] > 0).to(torch.int64), m)  # same grid, both nearest: exactly aligned
        moved += int(not torch.equal(m, mask))
    assert moved >= 10
    # bilinear image, every op: the bright square's centre of mass stays on the mask's (solarize may invert the
    # square, so it is left out of the check), and the intensity ops never touch the mask
    strong = Views(spatial_dims=d, pad=3, n_ops=2, op_prob=1.0)
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij"))
    checked = 0
    for _ in range(20):
        out, params, m = strong(image, g, mask)
        if all(op.name != "solarize" for op in params.ops):
            w = out[0] - out[0].min()
            centre_image = (grid * w).flatten(1).sum(1) / w.sum()
            centre_mask = (grid * m).flatten(1).sum(1) / m.sum()
            assert torch.allclose(centre_image, centre_mask, atol=0.5), params.describe()
            checked += 1
        if all(op.name not in GEOMETRIC_OPS for op in params.ops):
            geometry = {"pad": params.pad, "offsets": params.crop_offsets, "flip_axes": params.flip_axes}
            assert torch.equal(m, flip_crop(mask[None], **geometry)[0])
    assert checked >= 12


@pytest.mark.parametrize("shape", [(17, 18), (17, 18, 19)])
def test_every_op_keeps_shape_range_and_finiteness(shape: tuple[int, ...]) -> None:
    views = Views(spatial_dims=len(shape), pad=2, n_ops=2, op_prob=1.0, magnitude_range=(0, 10))
    x = _rand((2, *shape), seed=5)
    x[0] = 0.7  # a constant channel
    g = torch.Generator().manual_seed(3)
    for _ in range(30):
        out, params = views(x, g)
        assert out.shape == x.shape and out.dtype == x.dtype
        assert torch.isfinite(out).all() and out.min() >= -1 and out.max() <= 1
    for name in OPS:
        out, m = apply_op(x, OpDraw(name, 9, -1, True), mask=torch.ones(1, *shape, dtype=torch.bool))
        assert out.shape == x.shape and m.shape == (1, *shape) and m.dtype == torch.bool


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="spatial_dims"):
        Views(spatial_dims=1)
    with pytest.raises(ValueError, match="unknown"):
        Views(spatial_dims=2, n_ops=2, ops=("rotate", "cutout"))
    with pytest.raises(ValueError, match="magnitude_range"):
        Views(spatial_dims=2, magnitude_range=(1, 11))
    with pytest.raises(ValueError, match="pad_mode"):
        Views(spatial_dims=2, pad_mode="wrap")
    views = strong_views(spatial_dims=2, size=17)
    params = views.sample(torch.Generator().manual_seed(0), (17, 18))
    with pytest.raises(ValueError, match="drawn for"):
        views.apply(_rand((1, 17, 17)), params)
    with pytest.raises(ValueError, match="float image"):
        views.apply(torch.zeros(1, 17, 18, dtype=torch.int64), params)
    with pytest.raises(ValueError, match="crop_offsets"):
        ViewParams(spatial_shape=(5, 5), pad=(1, 1), crop_offsets=(3, 0))
