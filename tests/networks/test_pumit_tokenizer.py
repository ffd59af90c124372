"""PUMIT tokenizer (``shared/methods/pumit.md`` §2.3): token-grid bookkeeping and exact shape restoration
(invariant 4), soft = hard at one-hot (invariant 6), soft tokens sum to one, the three quantisers, the discriminator.

Volumes are ``(B, C, X, Y, Z)`` with the slice axis last. Widths are tiny so that each test takes well under a second.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medmodal.layers.sac import SACConvTranspose, SACState
from medmodal.networks.pumit_tokenizer import (
    PUMITDiscriminator,
    PUMITQuantizer,
    PUMITTokenizer,
    pumit_tokenizer_tiny,
)

TINY = {"widths": (8, 8, 16), "num_codes": 16, "code_dim": 8}


def _tokenizer(**kw: object) -> PUMITTokenizer:
    torch.manual_seed(0)
    return PUMITTokenizer(**{**TINY, **kw})  # type: ignore[arg-type]


def _depth_scales(net: PUMITTokenizer) -> tuple[list[int], list[torch.utils.hooks.RemovableHandle]]:
    scales: list[int] = []

    def hook(_m: torch.nn.Module, inp: tuple[torch.Tensor, SACState], out: tuple[torch.Tensor, SACState]) -> None:
        scales.append(out[0].shape[-1] // inp[0].shape[-1])

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, SACConvTranspose)]
    return scales, handles


@pytest.mark.parametrize("da", [0, 1, 2, 3, 4, 5])
def test_bookkeeping_every_da(da: int) -> None:
    net = _tokenizer()
    depth = 3 * 2 ** max(4 - da, 0)  # three token slices
    x = torch.randn(1, 1, 32, 48, depth)
    z, state = net.encode(x, SACState(da))
    assert state == SACState(da, 4)  # invariant 4: n = 4 for every DA
    assert z.shape == (1, 16, 2, 3, 3) and net.token_size(da) == (16, 16, 2 ** max(4 - da, 0))
    q = net.quantize(z)
    scales, handles = _depth_scales(net)
    x_hat, out_state = net.decode(q.z_q, state)
    for h in handles:
        h.remove()
    assert x_hat.shape == x.shape and out_state == SACState(da, 0)
    # Depth is upsampled max(4 - DA, 0) times (x2 each): the two x2 blocks while u > 0, the x4 head by min(2^u, 4).
    assert scales[0] * scales[1] * scales[2] == 2 ** max(4 - da, 0)
    u = max(4 - da, 0)
    assert scales == [min(2**u, 2), min(2 ** max(u - 1, 0), 2), min(2 ** max(u - 2, 0), 4)]


@pytest.mark.parametrize(("da", "shape"), [(0, (128, 128, 64)), (2, (128, 128, 16))])
def test_spec_examples(da: int, shape: tuple[int, int, int]) -> None:
    """64x128x128 at DA 0 and 16x128x128 at DA 2 (depth patch 16 >> 2 = 4) give the 4x8x8 token grid (depth last
    here: 8x8x4) and come back to their shape."""
    net = _tokenizer(widths=(8, 8, 8), num_codes=8)
    x = torch.randn(1, 1, *shape)
    with torch.no_grad():
        logits = net.tokenize(x, da)
        x_hat, q = net(x, da)
    assert logits.shape == (1, 8, 8, 8, 4) and q.probs.shape == (1, 8, 8, 8, 4)
    assert x_hat.shape == x.shape


def test_2d_image_round_trip_as_one_slice_volume() -> None:
    net = _tokenizer(in_channels=3)
    x2d = torch.randn(2, 3, 32, 16)
    x_hat, q = net(x2d.unsqueeze(-1), 5)
    assert x_hat.shape == (2, 3, 32, 16, 1) and q.probs.shape == (2, 16, 2, 1, 1)
    assert x_hat.squeeze(-1).shape == x2d.shape


def test_tiny_variant_stride_8_and_cpu_recipe_grid() -> None:
    net = pumit_tokenizer_tiny()
    assert net.stride == 8 and net.quantizer.codebook.shape == (64, 32)
    z, state = net.encode(torch.randn(1, 1, 32, 32, 8), SACState(2))  # the spec's 8x32x32 at DA 2
    assert z.shape == (1, 64, 4, 4, 4) and state == SACState(2, 3)


@pytest.mark.parametrize("kind", ["soft", "nearest", "gumbel"])
def test_quantizers_round_trip_and_every_parameter_gets_gradient(kind: str) -> None:
    net = _tokenizer(quantizer=kind, code_dim=12)
    x = torch.randn(2, 1, 16, 32, 4)
    x_hat, q = net(x, 2, temperature=0.5)
    assert x_hat.shape == x.shape
    assert q.z_q.shape == (2, 12, 1, 2, 1) and q.probs.shape == q.logits.shape == (2, 16, 1, 2, 1)
    torch.testing.assert_close(q.probs.sum(1), torch.ones(2, 1, 2, 1))  # soft tokens sum to one
    (F.l1_loss(x_hat, x) + q.vq_loss + q.probs.square().mean()).backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing, missing


def test_soft_tokens_are_the_probability_weighted_codebook() -> None:
    torch.manual_seed(0)
    quant = PUMITQuantizer(in_dim=8, num_codes=16, code_dim=6).double()
    z = torch.randn(2, 8, 3, 1, 2, dtype=torch.float64)
    q = quant(z)
    torch.testing.assert_close(q.probs, q.logits.softmax(1))
    assert torch.all(q.probs > 0) and q.vq_loss.item() == 0.0
    manual = (q.probs.unsqueeze(2) * quant.codebook.t()[None, :, :, None, None, None].transpose(1, 2)).sum(1)
    torch.testing.assert_close(q.z_q, manual)


def test_soft_equals_hard_at_one_hot() -> None:
    """Invariant 6: a one-hot p_i on code k gives z_q,i = e_k exactly."""
    torch.manual_seed(0)
    quant = PUMITQuantizer(in_dim=4, num_codes=8, code_dim=5).double()
    codes = torch.tensor([3, 0, 7, 3])
    one_hot = F.one_hot(codes, 8).double().t().reshape(1, 8, 2, 2, 1)
    assert torch.equal(quant.embed(one_hot), quant.codebook[codes].t().reshape(1, 5, 2, 2, 1))
    # Through the logits: a huge bias on code 5 saturates the softmax to an exact one-hot in float64.
    with torch.no_grad():
        assert quant.proj is not None
        quant.proj.weight.zero_()
        quant.proj.bias.zero_()
        quant.proj.bias[5] = 1e4
    q = quant(torch.randn(1, 4, 2, 3, 1, dtype=torch.float64))
    assert torch.equal(q.probs.argmax(1), torch.full((1, 2, 3, 1), 5))
    assert torch.equal(q.probs.max(1).values, torch.ones(1, 2, 3, 1, dtype=torch.float64))
    assert torch.equal(q.z_q, quant.codebook[5].reshape(1, 5, 1, 1, 1).expand(1, 5, 2, 3, 1))


def test_nearest_picks_the_closest_code_with_straight_through_and_commitment() -> None:
    torch.manual_seed(0)
    quant = PUMITQuantizer(in_dim=3, num_codes=4, code_dim=3, kind="nearest").double()
    with torch.no_grad():
        quant.codebook.copy_(torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]]))
    z = torch.tensor([[0.9, 0.1, 0.0], [0.1, 0.0, 0.2], [0.0, 0.0, 0.7]], dtype=torch.float64)
    z = z.t().reshape(1, 3, 3, 1, 1).requires_grad_()
    q = quant(z)
    assert q.probs[0, :, :, 0, 0].argmax(0).tolist() == [1, 0, 3]
    torch.testing.assert_close(q.probs.sum(1), torch.ones(1, 3, 1, 1, dtype=torch.float64))
    assert torch.equal(q.z_q.detach()[0, :, :, 0, 0].t(), quant.codebook[[1, 0, 3]].detach())
    e = quant.codebook[[1, 0, 3]].detach()
    mse = (e - z.detach()[0, :, :, 0, 0].t()).square().mean()
    torch.testing.assert_close(q.vq_loss, 1.25 * mse)  # codebook + 0.25 commitment, equal in value
    q.z_q.sum().backward()
    torch.testing.assert_close(z.grad, torch.ones_like(z))  # straight-through


def test_gumbel_eval_is_hard_and_training_is_soft() -> None:
    torch.manual_seed(0)
    quant = PUMITQuantizer(in_dim=4, num_codes=8, code_dim=5, kind="gumbel").double()
    z = torch.randn(1, 4, 3, 2, 1, dtype=torch.float64)
    hard = quant.eval()(z, temperature=0.9).z_q
    codes = (hard.movedim(1, -1).unsqueeze(-2) - quant.codebook).abs().sum(-1).min(-1).values
    assert torch.all(codes < 1e-12)  # every eval token is one codebook entry
    soft = quant.train()(z, temperature=0.9).z_q
    codes = (soft.movedim(1, -1).unsqueeze(-2) - quant.codebook).abs().sum(-1).min(-1).values
    assert torch.all(codes > 1e-6)
    with pytest.raises(ValueError, match="temperature"):
        quant(z, temperature=0.0)


def test_discriminator_patch_logits() -> None:
    torch.manual_seed(0)
    disc = PUMITDiscriminator(in_channels=1, widths=(8, 8, 16))
    assert disc(torch.randn(2, 1, 32, 16, 8), 0).shape == (2, 1, 4, 2, 1)
    assert disc(torch.randn(2, 1, 32, 16, 8), 2).shape == (2, 1, 4, 2, 4)  # 2 in-plane-only steps first
    assert disc(torch.randn(2, 1, 32, 16, 1), 5).shape == (2, 1, 4, 2, 1)


def test_clear_errors() -> None:
    net = _tokenizer()
    with pytest.raises(ValueError, match=r"one-slice volume"):
        net.encode(torch.randn(1, 1, 32, 32), SACState(5))
    with pytest.raises(ValueError, match=r"expects an image \(B, 1, X, Y, Z\)"):
        net.encode(torch.randn(1, 3, 32, 32, 16), SACState(0))
    with pytest.raises(ValueError, match=r"multiple of the token size \(16, 16, 4\)"):
        net.encode(torch.randn(1, 1, 32, 32, 6), SACState(2))
    with pytest.raises(ValueError, match=r"multiple of the token size"):
        net.encode(torch.randn(1, 1, 8, 16, 1), SACState(5))  # smaller than one token
    with pytest.raises(ValueError, match="n=4"):
        net.decode(torch.randn(1, 8, 1, 1, 1), SACState(0, 3))
    with pytest.raises(ValueError, match="quantizer must be"):
        _tokenizer(quantizer="vq")
    with pytest.raises(ValueError, match="norm_groups"):
        _tokenizer(widths=(8, 12))
    with pytest.raises(TypeError):
        pumit_tokenizer_tiny(widht=(8,))
