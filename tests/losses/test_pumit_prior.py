"""PUMIT prior regularisers and codebook statistics (``shared/methods/pumit.md`` §2.3, invariant 5)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medmodal.losses import pumit_prior
from medmodal.losses.pumit_prior import codebook_usage, entropy_loss, gather_with_local_grad, quant_prior_loss

K = 8
D64 = torch.float64


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.log()).sum(-1)


def test_ranges_on_random_distributions() -> None:
    torch.manual_seed(0)
    for scale in (0.1, 1.0, 10.0):
        probs = (scale * torch.randn(3, K, 5, 4, 2, dtype=D64)).softmax(1)
        lq, le = quant_prior_loss(probs).item(), entropy_loss(probs).item()
        assert -math.log(K) <= lq <= 0 and 0 <= le <= math.log(K)
        flat = probs.movedim(1, -1).reshape(-1, K)
        assert lq == pytest.approx(-_entropy(flat.mean(0)).item(), abs=1e-12)
        assert le == pytest.approx(_entropy(flat).mean().item(), abs=1e-12)


def test_extreme_values() -> None:
    uniform = torch.full((4, K), 1.0 / K, dtype=D64)
    assert quant_prior_loss(uniform).item() == pytest.approx(-math.log(K), abs=1e-12)
    assert entropy_loss(uniform).item() == pytest.approx(math.log(K), abs=1e-12)
    same_code = F.one_hot(torch.full((6,), 2), K).to(D64)
    assert quant_prior_loss(same_code).item() == 0.0 and entropy_loss(same_code).item() == 0.0
    every_code = F.one_hot(torch.arange(K), K).to(D64)  # one-hot positions spread evenly over the codes
    assert quant_prior_loss(every_code).item() == pytest.approx(-math.log(K), abs=1e-12)
    assert entropy_loss(every_code).item() == 0.0
    # One-hot inputs keep finite gradients (0 log 0 handled).
    logits = torch.tensor([[60.0, -60.0, -60.0]], requires_grad=True)
    (quant_prior_loss(logits.softmax(1)) + entropy_loss(logits.softmax(1))).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize(
    ("loss", "entropy_of", "direction"),
    [
        (quant_prior_loss, "mean", +1),  # descent on w_q L_quant raises H(pbar)
        (entropy_loss, "positions", -1),  # descent on w_e L_ent lowers mean_i H(p_i)
    ],
)
def test_gradient_signs(loss: object, entropy_of: str, direction: int) -> None:
    torch.manual_seed(1)
    logits = torch.randn(16, K, dtype=D64).mul(2).add(torch.linspace(0, 3, K, dtype=D64)).requires_grad_()

    def measure(lg: torch.Tensor) -> float:
        p = lg.softmax(1)
        return float(_entropy(p.mean(0)) if entropy_of == "mean" else _entropy(p).mean())

    before = measure(logits.detach())
    for weight in (0.03, 1.0):
        logits.grad = None
        (weight * loss(logits.softmax(1))).backward()  # type: ignore[operator]
        after = measure(logits.detach() - 0.5 * logits.grad)
        assert direction * (after - before) > 1e-6, (weight, before, after)


def test_gather_is_identity_without_process_group() -> None:
    x = torch.randn(5, K)
    assert gather_with_local_grad(x) is x


def test_gather_keeps_gradient_of_the_local_part_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake 3-rank all-gather: the loss sees every rank's positions, the gradient reaches only this rank's."""
    others = {0: torch.full((2, K), 1.0 / K, dtype=D64), 2: F.one_hot(torch.tensor([1, 1]), K).to(D64)}
    monkeypatch.setattr(pumit_prior.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(pumit_prior.dist, "get_world_size", lambda: 3)
    monkeypatch.setattr(pumit_prior.dist, "get_rank", lambda: 1)

    def all_gather(parts: list[torch.Tensor], x: torch.Tensor) -> None:
        assert not x.requires_grad
        for r, part in enumerate(parts):
            part.copy_(others.get(r, x))

    monkeypatch.setattr(pumit_prior.dist, "all_gather", all_gather)
    logits = torch.randn(2, K, dtype=D64, requires_grad=True)
    probs = logits.softmax(1)
    lq = quant_prior_loss(probs)
    everything = torch.cat([others[0], probs.detach(), others[2]])
    assert lq.item() == pytest.approx(quant_prior_loss(everything, gather=False).item(), abs=1e-12)
    lq.backward()
    # The same gradient as computing with the other ranks' positions as constants.
    ref_logits = logits.detach().clone().requires_grad_()
    quant_prior_loss(torch.cat([others[0], ref_logits.softmax(1), others[2]]), gather=False).backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad)
    assert gather_with_local_grad(probs).shape == (6, K)


def test_codebook_usage() -> None:
    probs = F.one_hot(torch.tensor([0, 0, 3, 5]), K).float().t().reshape(1, K, 2, 2, 1)
    stats = codebook_usage(probs)
    assert stats.usage == 3 / K
    assert stats.perplexity == pytest.approx(math.exp(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))))
    uniform = codebook_usage(torch.full((10, K), 1.0 / K))
    assert uniform.perplexity == pytest.approx(K) and uniform.usage == 1 / K  # argmax ties go to code 0
    with pytest.raises(ValueError, match="codes on axis 1"):
        codebook_usage(torch.ones(K))
