"""ShaSpec's auxiliary losses: spec invariants 7-9 (aux-loss masking, DAO pairs and zeros, DCO labels)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medmodal.losses.shaspec import dao_loss, dco_loss, modality_pairs
from medmodal.networks.registry import create_network

MODS = ("t1", "t1c", "t2", "flair")


def test_cyclic_and_all_pairs() -> None:
    assert modality_pairs([0, 1, 2, 3]) == [(0, 1), (1, 2), (2, 3), (3, 0)]
    assert modality_pairs([1, 3]) == [(1, 3)]
    assert modality_pairs([2]) == []
    assert modality_pairs([0, 2, 3], pairs="all") == [(0, 2), (0, 3), (2, 3)]
    with pytest.raises(ValueError, match="dao_pairs"):
        modality_pairs([0, 1], pairs="ring")  # type: ignore[arg-type]


@pytest.mark.parametrize("form", ["l1_pairs", "mse_pairs", "kl_softmax_pairs"])
def test_dao_is_zero_for_equal_features_and_positive_otherwise(form: str) -> None:
    r = torch.randn(2, 1, 5, 3, 4, 3).expand(2, 4, 5, 3, 4, 3)
    av = torch.ones(2, 4, dtype=torch.bool)
    assert dao_loss(r, av, form=form) == 0
    assert dao_loss(torch.randn(2, 4, 5, 3, 4, 3), av, form=form) > 0


def test_dao_uses_only_available_modalities_and_matches_the_formula() -> None:
    torch.manual_seed(0)
    r = torch.randn(2, 4, 3, 5, 5)
    av = torch.tensor([[True, False, True, True], [False, True, False, False]])
    expected = ((r[0, 0] - r[0, 2]).abs().mean() + (r[0, 2] - r[0, 3]).abs().mean()
                + (r[0, 3] - r[0, 0]).abs().mean()) / 2  # sample 1 has one modality: no pair
    assert torch.allclose(dao_loss(r, av), expected)
    garbage = r.clone()
    garbage[0, 1] = float("nan")
    garbage[1, [0, 2, 3]] = 1e9
    assert torch.allclose(dao_loss(garbage, av), expected)


def test_dco_perfect_logits_and_labels_are_modality_indices() -> None:
    perfect = 50.0 * torch.eye(4).expand(3, 4, 4)
    av = torch.ones(3, 4, dtype=torch.bool)
    assert dco_loss(perfect, av) < 1e-6
    logits = torch.randn(3, 4, 4)
    av = torch.tensor([[True, False, True, False]] * 3)
    expected = F.cross_entropy(logits[:, [0, 2]].reshape(-1, 4), torch.tensor([0, 2] * 3))
    assert torch.allclose(dco_loss(logits, av), expected)
    with pytest.raises(ValueError, match=r"\(B, M, M\)"):
        dco_loss(torch.randn(3, 4, 3), av)


def test_aux_losses_give_no_gradient_to_a_missing_modality_encoder() -> None:
    # Spec invariant 7: with the auxiliary losses over available modalities only, the specific encoder of a
    # missing modality gets no gradient from DAO + DCO (it is never run).
    torch.manual_seed(0)
    net = create_network("shaspec_tiny", spatial_dims=3, modalities=MODS, out_channels=3)
    x = torch.randn(2, 4, 9, 10, 11)
    av = torch.tensor([[True, True, False, True], [True, False, False, True]])
    out = net.forward_features(x, av)
    (dao_loss(out.shared, av) + dco_loss(out.domain_logits, av)).backward()
    grads = {n: p.grad for n, p in net.named_parameters()}
    assert all(g is None or not g.any() for n, g in grads.items() if n.startswith("specific_encoders.t2."))
    assert any(g is not None and g.any() for n, g in grads.items() if n.startswith("specific_encoders.t1."))
