"""MedCoSS encoder, MAE decoder and MLM head: shapes on tiny odd grids (2D and 3D), the shared mask and exact zero
distillation (spec invariant 5), MAE visible counts (8), bidirectional vs causal text attention (9), resampled vs
linear-index positions (12), drop-path in training only, gradients into every tokenizer."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from medmodal.losses.medcoss import distillation_loss, mae_loss, mlm_loss, patchify, random_keep
from medmodal.networks.medcoss import MAEDecoder, MedCoSSEncoder, MLMHead, medcoss_vit_tiny
from medmodal.networks.pumit_vit import resample_position_grid
from medmodal.networks.registry import create_network

W = 32


def _enc(**kw: object) -> MedCoSSEncoder:
    torch.manual_seed(0)
    return medcoss_vit_tiny(width=W, heads=4, **kw)


def _decoder(dims: int, enc: MedCoSSEncoder) -> MAEDecoder:
    kind = f"image{dims}d"
    channels = 3 if dims == 2 else 1
    grid = enc.tokenizers[kind].pos_grid
    return MAEDecoder(
        spatial_dims=dims,
        patch_size=enc.patch_size(kind),
        channels=channels,
        encoder_width=W,
        width=16,
        depth=1,
        heads=2,
        pos_grid=grid,
    )


# 2D: 24 x 40 -> grid 3 x 5; 3D: 16 x 24 x 40 -> 2 x 3 x 5 (odd token grids, not the position grid's shape)
SHAPES = {2: (24, 40), 3: (16, 24, 40)}


@pytest.mark.parametrize("dims", [2, 3])
def test_image_tokens_and_mae_shapes(dims: int) -> None:
    enc = _enc()
    kind = f"image{dims}d"
    x = torch.randn(2, 1, *SHAPES[dims])
    tokens = enc.tokenize(kind, x)
    grid = tuple(s // 8 for s in SHAPES[dims])
    length = math.prod(grid)
    assert tokens.grid == grid and tokens.tokens.shape == (2, 1 + length, W) and tokens.key_mask.all()
    draw = random_keep(2, length, generator=torch.Generator().manual_seed(0))
    encoded = enc.encode(tokens, keep=draw.keep)
    assert encoded.shape == (2, 1 + length // 4, W)  # spec invariant 8: floor(L / 4) visible tokens + cls
    pred = _decoder(dims, enc)(encoded, draw.keep, grid)
    channels = 3 if dims == 2 else 1
    assert pred.shape == (2, length, 8**dims * channels)
    target = patchify(enc.image_input(kind, x), enc.patch_size(kind))
    assert target.shape == pred.shape
    # the encoded kept tokens are what a full encode of the same kept tokens gives (cls first)
    assert torch.allclose(enc.eval().encode(tokens, keep=draw.keep)[:, 0], enc.encode(tokens, keep=draw.keep)[:, 0])


def test_grey_is_replicated_to_rgb_and_wrong_inputs_are_clear_errors() -> None:
    enc = _enc().eval()
    grey = torch.randn(1, 1, 16, 24)
    with torch.no_grad():
        assert torch.equal(enc("image2d", grey), enc("image2d", grey.expand(-1, 3, -1, -1).contiguous()))
    with pytest.raises(ValueError, match=r"multiple of the patch \(8, 8\)"):
        enc("image2d", torch.randn(1, 3, 17, 24))
    with pytest.raises(ValueError, match=r"kind 'image3d' expects a float image \(B, 1 or 1, X, Y, Z\)"):
        enc("image3d", torch.randn(1, 1, 16, 16))
    with pytest.raises(ValueError, match="has no tokenizer of kind 'audio'; it has text, image2d, image3d"):
        enc.tokenize("audio", grey)
    text_only = _enc(kinds=("text",))
    assert text_only.has_kind("text") and not text_only.has_kind("image2d") and text_only.cls_token is None
    with pytest.raises(ValueError, match="no tokenizer of kind 'image2d'; it has text"):
        text_only("image2d", grey)
    with pytest.raises(ValueError, match="longer than max_text_len=32"):
        enc("text", torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match=r"vocab_size=64"):
        enc("text", torch.full((1, 4), 64))
    with pytest.raises(ValueError, match="kinds must be"):
        _enc(kinds=("text", "video"))


def test_shared_keep_and_exact_zero_distillation() -> None:
    """Spec invariant 5: one noise -> one kept set for student and teacher; equal weights, both eval -> L_kd == 0."""
    student = _enc()
    teacher = copy.deepcopy(student).requires_grad_(False)
    student.eval(), teacher.eval()
    x = torch.randn(3, 1, 16, 24, 16)
    length = 2 * 3 * 2
    keep_s = random_keep(3, length, generator=torch.Generator().manual_seed(7)).keep
    keep_t = random_keep(3, length, generator=torch.Generator().manual_seed(7)).keep
    assert torch.equal(keep_s, keep_t)
    s = student("image3d", x, keep=keep_s)
    with torch.no_grad():
        t = teacher("image3d", x, keep=keep_t)
    assert distillation_loss(s, t).item() == 0.0
    # the code's teacher_mode (teacher left in train mode): drop-path makes the targets stochastic
    teacher.train()
    torch.manual_seed(1)
    with torch.no_grad():
        t_train = teacher("image3d", x, keep=keep_t)
    assert distillation_loss(s, t_train).item() > 0.0


def test_text_attention_bidirectional_vs_causal_and_padding() -> None:
    """Spec invariant 9: bidirectional -> token 0 depends on token L-1; causal -> it does not."""
    ids = torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 5) % 64
    for mode, depends in (("bidirectional", True), ("causal", False)):
        enc = _enc(text_attention=mode).eval()
        with torch.no_grad():
            a, b = enc("text", ids), enc("text", changed)
        assert torch.equal(a[:, 0], b[:, 0]) is not depends, mode
        assert not torch.equal(a[:, -1], b[:, -1])
    # padding keys are never read by real tokens (bidirectional)
    enc = _enc().eval()
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[:, 6:] = False
    garbage = ids.clone()
    garbage[:, 6:] = torch.randint(0, 64, (2, 3))
    with torch.no_grad():
        a, b = enc("text", ids, mask), enc("text", garbage, mask.long())
    assert torch.allclose(a[:, :6], b[:, :6], atol=1e-6) and torch.isfinite(b).all()
    assert not torch.allclose(enc("text", ids)[:, :6], a[:, :6])  # without the mask they are read


def test_resampled_positions_interpolate_a_bigger_grid() -> None:
    """Spec invariant 12 at the spec's sizes: pre-training grid 12 x 12 x 1 (192 x 192 x 16, patch 16), a
    192 x 192 x 64 input gets a 12 x 12 x 4 grid interpolated from it (no table row is indexed)."""
    torch.manual_seed(0)
    enc = MedCoSSEncoder(
        width=16, depth=1, heads=2, kinds=("image2d", "image3d"), pos_grid_3d=(12, 12, 1), pos_grid_2d=(14, 14)
    ).eval()
    tok = enc.tokenizers["image3d"]
    pos = tok.positions((12, 12, 4)).view(12, 12, 4, 16)
    stored = tok.pos_embed[0].permute(1, 2, 3, 0)  # (12, 12, 1, W)
    assert torch.allclose(pos, stored.expand(-1, -1, 4, -1))
    with torch.no_grad():
        tokens = enc.tokenize("image3d", torch.randn(1, 1, 192, 192, 64))
    assert tokens.grid == (12, 12, 4) and tokens.tokens.shape == (1, 1 + 576, 16)
    # 2D: 512^2 (GlaS) -> 32 x 32 from the 14 x 14 pre-training grid, and a smaller grid is area-averaged
    pos2 = enc.tokenizers["image2d"].positions((32, 32))
    ref = resample_position_grid(tok_param := enc.tokenizers["image2d"].pos_embed.unsqueeze(-1), (32, 32, 1))
    assert pos2.shape == (1, 1024, 16) and torch.allclose(pos2, ref.squeeze(-1).flatten(2).transpose(1, 2))
    assert tok_param.shape == (1, 16, 14, 14, 1)
    assert enc.tokenizers["image2d"].positions((7, 7)).shape == (1, 49, 16)


def test_linear_index_positions_use_leading_rows_and_refuse_too_many_tokens() -> None:
    enc = _enc(pos_embed="linear_index").eval()  # 3D table: 4 * 4 * 1 = 16 rows
    tok = enc.tokenizers["image3d"]
    assert tok.pos_embed.shape == (1, 16, W)
    assert torch.equal(tok.positions((2, 3, 2)), tok.pos_embed[:, :12])  # row-major linear index, as the code
    with pytest.raises(
        ValueError, match=r"linear_index' has 16 position rows .* has 32 tokens; use pos_embed='resampled'"
    ):
        enc("image3d", torch.randn(1, 1, 32, 32, 16))


def test_drop_path_only_in_training_mode() -> None:
    x = torch.randn(4, 3, 16, 24)
    enc = _enc(drop_path=0.5)
    enc.eval()
    assert torch.equal(enc("image2d", x), enc("image2d", x))
    enc.train()
    torch.manual_seed(0)
    a = enc("image2d", x)
    torch.manual_seed(1)
    assert not torch.equal(a, enc("image2d", x))
    no_drop = _enc(drop_path=0.0).train()
    assert torch.equal(no_drop("image2d", x), no_drop("image2d", x))


def test_layer_scale_and_no_final_norm() -> None:
    enc = _enc().eval()
    assert all(torch.all(b.gamma1 == 1e-3) and torch.all(b.gamma2 == 1e-3) for b in enc.blocks)
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in enc.children())
    tokens = enc.tokenize("image2d", torch.randn(2, 3, 16, 24))
    out = enc.encode(tokens)
    # residual branches start at 1e-3 of their size and nothing normalises the sum: the output ~ the tokens
    assert (out - tokens.tokens).abs().max() < 0.05 * tokens.tokens.abs().max()


@pytest.mark.parametrize("kind", ["image2d", "image3d", "text"])
def test_gradients_reach_tokenizer_blocks_and_heads(kind: str) -> None:
    enc = _enc()
    if kind == "text":
        head = MLMHead(width=W, vocab_size=64)
        assert head.decoder.weight is not enc.tokenizers["text"].embed.weight and head.decoder.bias is not None
        ids = torch.randint(0, 64, (2, 11))
        labels = torch.full((2, 11), -100)
        labels[:, 3] = ids[:, 3]
        loss = mlm_loss(head(enc("text", ids)), labels)
    else:
        dims = int(kind[5])
        x = torch.randn(2, 1, *SHAPES[dims])
        tokens = enc.tokenize(kind, x)
        draw = random_keep(2, math.prod(tokens.grid), generator=torch.Generator().manual_seed(0))
        head = _decoder(dims, enc)
        pred = head(enc.encode(tokens, keep=draw.keep), draw.keep, tokens.grid)
        loss = mae_loss(pred, patchify(enc.image_input(kind, x), enc.patch_size(kind)), draw.mask)
    loss.backward()
    used = [(n, p) for n, p in enc.named_parameters() if n.startswith(("blocks", f"tokenizers.{kind}"))]
    if kind != "text":
        used.append(("cls_token", enc.cls_token))
    missing = [n for n, p in [*used, *head.named_parameters()] if p.grad is None or not p.grad.any()]
    assert not missing, missing
    others = [
        n for n, p in enc.named_parameters() if n.startswith("tokenizers.") and not n.startswith(f"tokenizers.{kind}")
    ]
    assert others and all(dict(enc.named_parameters())[n].grad is None for n in others)


def test_mae_decoder_positions_start_at_zero_and_registry_builds_the_encoder() -> None:
    enc = _enc()
    dec = _decoder(3, enc)
    assert not dec.pos_embed.any() and dec.mask_token.std() > 0
    with pytest.raises(ValueError, match="3D decoder got a 2D grid"):
        dec(torch.zeros(1, 2, W), torch.zeros(1, 1, dtype=torch.long), (2, 2))
    net = create_network("medcoss_vit", width=16, depth=1, heads=2, vocab_size=10, max_text_len=8)
    assert isinstance(net, MedCoSSEncoder) and net.kinds == ("text", "image2d", "image3d")
