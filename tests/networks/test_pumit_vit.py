"""PUMIT's ViT (spec §2.4, §3 invariants 4 and 8): SAC patch grid, resampled position grid, 3D RoPE, MIM scattering,
fine-tuning heads on every DA and odd grids, gradient coverage."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medmodal.layers.sac import SACState
from medmodal.losses.pumit import masked_positions, random_visible, soft_target_cross_entropy
from medmodal.networks.pumit_vit import (
    DEPTH_ROPE_BASE,
    PLANE_ROPE_BASE,
    PUMITViT,
    RotaryEmbedding3D,
    _Block,
    apply_rope,
    position_tokens,
    pumit_vit_tiny,
    resample_position_grid,
    rope_pairs,
)


def _no_grad(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]


def test_patch_grid_of_invariant_4_depth_last() -> None:
    # spec §3 invariant 4: 64x192x192 at DA 2 with patch 16 -> 16x12x12; medmodal puts depth last
    vit = PUMITViT(in_channels=1, patch_size=16, width=12, num_layers=1, num_heads=2)
    assert vit.token_grid((192, 192, 64), 2) == (12, 12, 16)
    assert vit.depth_patch(2) == 4 and vit.depth_patch(0) == 16 and vit.depth_patch(5) == 1
    with torch.no_grad():
        out = vit.encode(torch.zeros(1, 1, 192, 192, 64), 2)
    assert out.grid == (12, 12, 16) and out.tokens.shape == (1, 1 + 12 * 12 * 16, 12)


def test_position_grid_resampling() -> None:
    pos = torch.randn(1, 4, 6, 4, 2, dtype=torch.float64)
    assert resample_position_grid(pos, (6, 4, 2)) is pos  # native size: the stored grid, unchanged
    # shrinking is area averaging: 3x2x2 blocks -> their means (trilinear would sample, not average)
    small = resample_position_grid(pos, (2, 2, 1))
    torch.testing.assert_close(small, F.avg_pool3d(pos, (3, 2, 2)), rtol=0, atol=1e-12)
    # growing is trilinear: a grid linear along x stays linear inside (align_corners=False keeps the centres)
    ramp = torch.arange(3, dtype=torch.float64).reshape(1, 1, 3, 1, 1).expand(1, 1, 3, 2, 2)
    grown = resample_position_grid(ramp, (6, 2, 2))
    torch.testing.assert_close(grown[0, 0, 1:-1, 0, 0], torch.tensor([0.25, 0.75, 1.25, 1.75], dtype=torch.float64))
    # one axis shrinks while another grows: area on the first, trilinear on the second
    mixed = resample_position_grid(pos, (3, 8, 2))
    expected = F.interpolate(F.avg_pool3d(pos, (2, 1, 1)), size=(3, 8, 2), mode="trilinear", align_corners=False)
    torch.testing.assert_close(mixed, expected, rtol=0, atol=1e-12)


def test_native_grid_adds_the_stored_position_grid() -> None:
    torch.manual_seed(0)
    vit = pumit_vit_tiny(in_channels=1, patch_size=4, pos_grid=(3, 2, 4))
    x = torch.randn(1, 1, 12, 8, 16)
    with torch.no_grad():
        tokens, grid, _ = vit._embed(x, 0)
        plain, _ = vit.patch_embed(x, SACState(0))
    assert grid == (3, 2, 4)
    added = tokens - plain.flatten(2).transpose(1, 2)
    torch.testing.assert_close(added, vit.pos_embed.detach().flatten(2).transpose(1, 2))


def test_rope_pair_split_and_bases() -> None:
    assert rope_pairs(64) == (11, 11, 10) and rope_pairs(16) == (3, 3, 2) and rope_pairs(6) == (1, 1, 1)
    for bad in (4, 15):
        with pytest.raises(ValueError, match="even head dimension"):
            rope_pairs(bad)
    rope = RotaryEmbedding3D(head_dim=16)
    expected = [PLANE_ROPE_BASE ** (-j / 3) for j in range(3)] * 2 + [DEPTH_ROPE_BASE ** (-j / 2) for j in range(2)]
    torch.testing.assert_close(rope.inv_freq, torch.tensor(expected, dtype=torch.float32))
    # the angle of a token is index-along-its-axis times the frequency
    theta = rope.angles((2, 3, 4))
    index = 1 * 12 + 2 * 4 + 3  # token (1, 2, 3), row-major, Z fastest
    torch.testing.assert_close(theta[index], torch.tensor([1.0] * 3 + [2.0] * 3 + [3.0] * 2) * rope.inv_freq)


def test_rope_score_depends_only_on_the_offset() -> None:
    grid = (3, 4, 5)
    rope = RotaryEmbedding3D(head_dim=18).double()
    v = torch.randn(18, dtype=torch.float64)
    q = apply_rope(v.expand(math.prod(grid), 18), rope(grid))
    scores = q @ q.T  # q = k = the same vector at every token
    coords = torch.cartesian_prod(*(torch.arange(g) for g in grid))
    by_offset: dict[tuple[int, ...], float] = {}
    for i in range(len(coords)):
        for j in range(len(coords)):
            key = tuple((coords[j] - coords[i]).tolist())
            ref = by_offset.setdefault(key, float(scores[i, j]))
            assert abs(float(scores[i, j]) - ref) < 1e-10, key
    # and the offset matters, on every axis
    zero = by_offset[(0, 0, 0)]
    assert zero == pytest.approx(float(v @ v))
    for off in ((1, 0, 0), (0, 1, 0), (0, 0, 1)):
        assert abs(by_offset[off] - zero) > 1e-6
    assert abs(by_offset[(1, 0, 0)] - by_offset[(0, 0, 1)]) > 1e-6


def _reference_rope(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """The rotation written out: pairs (2i, 2i + 1) of every token but the first (cls) turned by ``theta``."""
    out = x.clone()
    even, odd = x[..., 1:, 0::2], x[..., 1:, 1::2]
    out[..., 1:, 0::2] = even * theta.cos() - odd * theta.sin()
    out[..., 1:, 1::2] = even * theta.sin() + odd * theta.cos()
    return out


def _reference_block(block: _Block, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """A pre-norm block done the plain way: separate q/k/v products, biases on q and v, RoPE by explicit pairs,
    softmax attention, SwiGLU ``w3(LN(silu(a) * b))``. ``theta``: grid-token angles ``(B, N - 1, Dh / 2)``."""
    batch, length, width = x.shape
    attn, mlp = block.attn, block.mlp
    heads, dim = attn.num_heads, attn.head_dim
    wq, wk, wv = attn.qkv.weight.chunk(3)
    h = block.norm1(x)

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(batch, length, heads, dim).transpose(1, 2)  # (B, H, N, Dh)

    q = _reference_rope(split(h @ wq.T + attn.q_bias), theta.unsqueeze(1))
    k = _reference_rope(split(h @ wk.T), theta.unsqueeze(1))
    v = split(h @ wv.T + attn.v_bias)
    weights = (q @ k.transpose(-1, -2) / math.sqrt(dim)).softmax(-1)
    x = x + attn.proj((weights @ v).transpose(1, 2).reshape(batch, length, width))
    a, b = (block.norm2(x) @ mlp.w12.weight.T + mlp.w12.bias).chunk(2, dim=-1)
    return x + mlp.w3(mlp.norm(a * torch.sigmoid(a) * b))


@pytest.mark.parametrize("per_item", [False, True])
def test_block_equals_the_plain_reference_in_float64(per_item: bool) -> None:
    # the fused qkv with a zero k bias, complex-product RoPE on views and SDPA compute the plain block's maths
    torch.manual_seed(0)
    block = _Block(width=30, num_heads=3, hidden=80).double()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    grid, batch = (2, 3, 4), 2
    rope = RotaryEmbedding3D(head_dim=10).double()
    theta = rope.angles(grid).expand(batch, -1, -1)  # (B, L, 5)
    rotation = rope(grid, cls_token=True)  # (1 + L, 5)
    if per_item:  # the visible-token path: each item its own subset of the grid tokens (rotation rows gathered)
        visible = torch.stack([torch.randperm(24)[:9] for _ in range(batch)])
        theta = torch.stack([t[v] for t, v in zip(theta, visible, strict=True)])
        rotation = rotation[torch.cat((visible.new_zeros(batch, 1), visible + 1), dim=1)]  # (B, 1 + n, 5)
    x = torch.randn(batch, 1 + theta.shape[1], 30, dtype=torch.float64, requires_grad=True)
    out = block(x, rotation)
    ref = _reference_block(block, x, theta)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    grads = torch.autograd.grad(out.square().sum(), [x, *block.parameters()])
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, *block.parameters()])
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)
    turned = _reference_block(block, x, theta + 1.0).detach()
    assert float((out.detach() - turned)[:, 0].abs().max()) > 1e-3  # RoPE matters, even to the unrotated cls token
    assert "attn.k_bias" not in block.state_dict()  # the zero k bias is no parameter and is not saved


def test_rotation_rows_and_half_precision() -> None:
    rope = RotaryEmbedding3D(head_dim=12)
    plain, with_cls = rope((2, 2, 3)), rope((2, 2, 3), cls_token=True)
    assert plain.shape == (12, 6) and plain.dtype == torch.complex64
    torch.testing.assert_close(with_cls[1:], plain, rtol=0, atol=0)
    torch.testing.assert_close(with_cls[0], torch.ones(6, dtype=torch.complex64), rtol=0, atol=0)
    torch.testing.assert_close(plain.abs(), torch.ones(12, 6), rtol=0, atol=1e-6)
    # bfloat16 (mixed precision) is rotated in float32 and given back in bfloat16; a strided x is accepted too
    x = torch.randn(12, 3, 12)
    turned = apply_rope(x.to(torch.bfloat16), plain.unsqueeze(1))
    assert turned.dtype == torch.bfloat16
    torch.testing.assert_close(turned.float(), apply_rope(x, plain.unsqueeze(1)), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(apply_rope(x[:, :, 1:-1], plain[:, :5].unsqueeze(1)),
                               apply_rope(x[:, :, 1:-1].contiguous(), plain[:, :5].unsqueeze(1)))


def test_position_tokens_are_the_resampled_grid_as_rows_and_train_after_inference() -> None:
    pos = torch.randn(1, 6, 5, 4, 3, dtype=torch.float64, requires_grad=True)
    for size in ((5, 4, 3), (2, 7, 3), (3, 2, 1), (9, 8, 6)):
        rows = position_tokens(pos, size)
        assert rows.shape == (math.prod(size), 6)
        reference = F.interpolate(F.adaptive_avg_pool3d(pos, [min(a, b) for a, b in zip((5, 4, 3), size, strict=True)]),
                                  size=size, mode="trilinear", align_corners=False)
        torch.testing.assert_close(rows, reference.flatten(2)[0].T, rtol=0, atol=1e-12)
        g = torch.randn_like(rows)
        torch.testing.assert_close(torch.autograd.grad(rows, pos, g)[0],
                                   torch.autograd.grad(reference.flatten(2)[0].T, pos, g)[0], rtol=0, atol=1e-12)
    # the per-axis matrices are cached; one first built under inference mode must still serve a training step
    vit = pumit_vit_tiny(in_channels=1, patch_size=4, pos_grid=(7, 5, 3))
    x = torch.randn(1, 1, 24, 24, 8)
    with torch.inference_mode():
        vit.encode(x, 0)
    vit.encode(x, 0).tokens.sum().backward()
    assert vit.pos_embed.grad is not None and vit.pos_embed.grad.abs().sum() > 0


def test_2d_image_is_a_one_slice_volume_and_3d_runs_through_the_same_model() -> None:
    torch.manual_seed(0)
    vit = pumit_vit_tiny(in_channels=2, patch_size=4).eval()
    img = torch.randn(2, 2, 13, 9)
    with torch.no_grad():
        flat = vit.encode(img, 5)
        vol = vit.encode(img.unsqueeze(-1), 5)
        three_d = vit.encode(torch.randn(2, 2, 8, 12, 6), 1)
    assert flat.grid == vol.grid == (4, 3, 1)
    torch.testing.assert_close(flat.tokens, vol.tokens, rtol=0, atol=0)
    assert three_d.grid == (2, 3, 3) and three_d.tokens.shape == (2, 1 + 18, 32)
    with pytest.raises(ValueError, match="one-slice volume at DA 5"):
        vit.encode(img, 2)
    with pytest.raises(ValueError, match="da must be an int"):
        vit.encode(img.unsqueeze(-1), 6)
    with pytest.raises(ValueError, match=r"expects an image \(B, 2, X, Y\)"):
        vit.encode(torch.randn(2, 3, 8, 8), 5)


def test_encode_with_all_tokens_visible_equals_plain_encode() -> None:
    torch.manual_seed(0)
    vit = pumit_vit_tiny(in_channels=1, patch_size=4).eval()
    x = torch.randn(2, 1, 12, 8, 8)
    with torch.no_grad():
        full = vit.encode(x, 0)
        every = vit.encode(x, 0, visible=torch.arange(12).expand(2, 12).contiguous())
        some = vit.encode(x, 0, visible=torch.tensor([[0, 5, 7], [1, 2, 11]]))
    torch.testing.assert_close(full.tokens, every.tokens)
    assert some.tokens.shape == (2, 4, 32)
    with pytest.raises(ValueError, match=r"visible indices must lie in \[0, L=12\)"):
        vit.encode(x, 0, visible=torch.tensor([[0, 12, 3], [1, 2, 3]]))


def _mim_model() -> PUMITViT:
    torch.manual_seed(0)
    return pumit_vit_tiny(in_channels=1, patch_size=4, num_layers=3, codebook_size=10).eval()


def test_mim_without_mask_layers_visible_logits_equal_the_visible_encoder() -> None:
    # the cls token is always in the sequence: visible logits are the head on encode(x, visible), cls included
    vit = _mim_model()
    x = torch.randn(2, 1, 8, 12, 12)  # grid (2, 3, 3)
    visible = random_visible(18, batch_size=2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = vit.forward_mim(x, 0, visible, [])
        enc = vit.encode(x, 0, visible=visible).tokens
        head = vit.mim_head(enc[:, 1:])
        mask_logit = vit.mim_head(vit.norm(vit.mask_token))[0, 0]
    assert logits.shape == (2, 18, 10)
    torch.testing.assert_close(logits.gather(1, visible.unsqueeze(-1).expand(-1, -1, 10)), head)
    masked = masked_positions(visible, 18)
    torch.testing.assert_close(logits[masked], mask_logit.expand(int(masked.sum()), 10))


@pytest.mark.parametrize("layers", [[0, 1, 2], [2]])
def test_mim_never_reads_masked_patches(layers: list[int]) -> None:
    vit = _mim_model()
    x = torch.randn(1, 1, 8, 8, 8)  # grid (2, 2, 2)
    visible = torch.tensor([[0, 3, 5]])
    y = x.clone()
    y[:, :, 4:, :4, 4:] = 1e3  # token (1, 0, 1) = index 5 (visible) changes
    z = x.clone()
    z[:, :, :4, 4:, :4] = 1e3  # token (0, 1, 0) = index 2 (masked) changes
    with torch.no_grad():
        a, b, c = (vit.forward_mim(t, 0, visible, layers) for t in (x, y, z))
    assert not torch.allclose(a, b)
    torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_mim_layer_choice_matters_and_bad_ids_are_refused() -> None:
    vit = _mim_model()
    x = torch.randn(1, 1, 8, 8, 8)
    visible = torch.tensor([[0, 3, 5]])
    with torch.no_grad():
        beit = vit.forward_mim(x, 0, visible, range(3))
        mae = vit.forward_mim(x, 0, visible, [2])
    assert not torch.allclose(beit, mae)
    with pytest.raises(ValueError, match=r"mask_layer_ids must lie in \[0, 3\)"):
        vit.forward_mim(x, 0, visible, [3])
    with pytest.raises(ValueError, match="codebook_size"):
        pumit_vit_tiny(in_channels=1).forward_mim(x, 0, visible, [0])


@pytest.mark.parametrize("layers", [[0, 1, 2], [1, 2]])
def test_every_parameter_gets_a_gradient_in_one_mim_step(layers: list[int]) -> None:
    vit = _mim_model().train()
    x = torch.randn(2, 1, 12, 8, 4)
    grid = vit.token_grid(x.shape[2:], 1)
    length = math.prod(grid)
    visible = random_visible(length, batch_size=2, generator=torch.Generator().manual_seed(0))
    logits = vit.forward_mim(x, 1, visible, layers)
    target = torch.randn(2, length, 10).softmax(-1)
    soft_target_cross_entropy(logits, target, masked_positions(visible, length)).backward()
    assert not _no_grad(vit)


SEG_SHAPES = [(13, 10, 7), (12, 20, 24)]  # ragged, and whole patches with odd grids (3, 5, 3|...) at every DA


@pytest.mark.parametrize("da", range(6))
@pytest.mark.parametrize("shape", SEG_SHAPES)
def test_heads_give_the_input_shape_on_every_da(da: int, shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    vit = pumit_vit_tiny(in_channels=2, patch_size=4, num_classes=3, out_channels=2).eval()
    if shape == SEG_SHAPES[1]:
        shape = (12, 20, 3 * vit.depth_patch(da))
        assert vit.token_grid(shape, da) == (3, 5, 3)
    padded = [g * p for g, p in zip(vit.token_grid(shape, da), (4, 4, vit.depth_patch(da)), strict=True)]
    seen: list[tuple[int, ...]] = []
    vit.seg_head.register_forward_hook(lambda _m, _i, out: seen.append(tuple(out.shape[2:])))
    x = torch.randn(2, 2, *shape)
    with torch.no_grad():
        assert vit.segment(x, da).shape == (2, 2, *shape)
        assert vit.classify(x, da).shape == (2, 3)
    assert seen == [tuple(padded)]  # the decoder undoes exactly the embedding's downsampling, depth included


def test_heads_in_2d_and_the_pooling_choice() -> None:
    torch.manual_seed(0)
    kw = {"in_channels": 1, "patch_size": 8, "num_classes": 4, "out_channels": 3}
    cls, mean = pumit_vit_tiny(**kw).eval(), pumit_vit_tiny(**kw, pool="mean").eval()
    mean.load_state_dict(cls.state_dict())
    x = torch.randn(2, 1, 21, 23)
    with torch.no_grad():
        assert cls.segment(x, 5).shape == (2, 3, 21, 23)
        tokens = cls.encode(x, 5).tokens
        torch.testing.assert_close(cls.classify(x, 5), cls.cls_head(tokens[:, 0]))
        torch.testing.assert_close(mean.classify(x, 5), cls.cls_head(tokens[:, 1:].mean(1)))
    with pytest.raises(ValueError, match="num_classes"):
        pumit_vit_tiny(in_channels=1).classify(x, 5)
    with pytest.raises(ValueError, match="out_channels"):
        pumit_vit_tiny(in_channels=1).segment(x, 5)
    with pytest.raises(ValueError, match="decoder_channels needs log2"):
        pumit_vit_tiny(in_channels=1, out_channels=2, decoder_channels=(8, 8))


@pytest.mark.parametrize(("shape", "da"), [((17, 18, 19), 2), ((21, 23), 5)])
def test_every_parameter_gets_a_gradient_in_one_segmentation_step(shape: tuple[int, ...], da: int) -> None:
    torch.manual_seed(0)
    vit = pumit_vit_tiny(in_channels=1, patch_size=8, out_channels=2)
    vit.segment(torch.randn(2, 1, *shape), da).square().mean().backward()
    assert not _no_grad(vit)


def test_constructor_errors() -> None:
    with pytest.raises(ValueError, match="power of 2"):
        PUMITViT(patch_size=12, width=32, num_layers=1, num_heads=2)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        PUMITViT(width=30, num_layers=1, num_heads=4)
    with pytest.raises(ValueError, match="pool must be"):
        pumit_vit_tiny(pool="max")
    with pytest.raises(TypeError):
        pumit_vit_tiny(depth=3)
