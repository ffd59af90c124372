"""Intra-modal mixup (MedCoSS spec shared/methods/medcoss.md §2.4, invariant 4)."""

from __future__ import annotations

import pytest
import torch

from medmodal.transforms.mixup import mix_images, mix_tokens

SHAPES = {"2d": (5, 1, 17, 18), "3d": (4, 1, 7, 8, 9), "2d_rgb": (3, 3, 11, 13)}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_images_are_mixed_per_sample_between_their_sources(shape: tuple[int, ...]) -> None:
    x = torch.randn(shape, generator=gen(1))
    mixed, lam, perm = mix_images(x, generator=gen(2))
    b = shape[0]
    assert mixed.shape == x.shape and lam.shape == (b,) and lam.dtype == x.dtype
    assert sorted(perm.tolist()) == list(range(b))
    assert bool(((lam >= 0) & (lam <= 1)).all()) and lam.unique().numel() == b  # one weight per sample
    lo, hi = torch.minimum(x, x[perm]), torch.maximum(x, x[perm])
    assert bool(((mixed >= lo) & (mixed <= hi)).all())  # elementwise between the two sources, exactly
    view = lam.reshape((b,) + (1,) * (x.ndim - 1))
    torch.testing.assert_close(mixed, view * x + (1 - view) * x[perm])


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_lambda_one_is_the_identity_and_zero_the_partner(shape: tuple[int, ...]) -> None:
    x = torch.randn(shape, generator=gen(3))
    same, lam, _ = mix_images(x, generator=gen(4), lam=1.0)
    assert torch.equal(same, x) and lam.tolist() == [1.0] * shape[0]
    partner, _, perm = mix_images(x, generator=gen(4), lam=0.0)
    assert torch.equal(partner, x[perm])


def test_fixed_lambda_and_permutation_are_used() -> None:
    x = torch.arange(3.0).reshape(3, 1, 1, 1).expand(3, 1, 2, 3).contiguous()
    mixed, lam, perm = mix_images(x, lam=torch.tensor([0.25, 0.5, 1.0]), perm=torch.tensor([2, 0, 1]))
    assert perm.tolist() == [2, 0, 1]
    assert mixed[:, 0, 0, 0].tolist() == [0.25 * 0 + 0.75 * 2, 0.5 * 1 + 0.5 * 0, 2.0]


def test_image_draws_come_from_the_generator_only() -> None:
    x = torch.randn(6, 1, 5, 7, generator=gen(5))
    a = mix_images(x, generator=gen(9))
    b = mix_images(x, generator=gen(9))
    c = mix_images(x, generator=gen(10))
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert not torch.equal(a[1], c[1])


def test_image_errors() -> None:
    x = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError, match=r"lam must lie in \[0, 1\]"):
        mix_images(x, lam=1.5)
    with pytest.raises(ValueError, match=r"one weight per sample \(2,\), got \(3,\)"):
        mix_images(x, lam=torch.tensor([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match=r"permutation of range\(2\)"):
        mix_images(x, perm=torch.tensor([0, 0]))
    with pytest.raises(ValueError, match=r"floating \(B, C, \*S\)"):
        mix_images(torch.zeros(2, 4, dtype=torch.long))


def text_batch(b: int = 4, length: int = 9, vocab: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(5, vocab, (b, length), generator=gen(6))
    mask = torch.ones(b, length, dtype=torch.long)
    for i in range(b):
        mask[i, length - 1 - i:] = 0  # sample i has i + 1 padding positions
    ids[mask == 0] = 0
    return ids, mask


def test_token_mixup_takes_each_token_from_the_sample_or_its_partner() -> None:
    ids, mask = text_batch()
    mixed, mixed_mask, r, perm = mix_tokens(ids, mask, generator=gen(7))
    assert r.ndim == 0 and 0 <= float(r) <= 1  # one r for the whole batch
    assert mixed.dtype == ids.dtype and mixed_mask.dtype == mask.dtype
    assert bool(((mixed == ids) | (mixed == ids[perm])).all())
    assert set(mixed_mask.unique().tolist()) <= {0, 1}
    assert int(mixed.min()) >= 0 and int(mixed.max()) < 50  # inside the vocabulary


def test_ids_and_mask_are_mixed_with_the_same_draw() -> None:
    """Every id differs from its partner's and every mask row differs from its partner's, so the source of each
    position is visible in both: they must agree."""
    b, length = 4, 400
    ids = torch.arange(b * length).reshape(b, length)
    mask = (torch.arange(b) % 2).reshape(b, 1).expand(b, length).contiguous()  # 0 1 0 1 rows
    perm = torch.tensor([1, 2, 3, 0])  # each row's partner has the other mask value
    mixed, mixed_mask, r, _ = mix_tokens(ids, mask.bool(), generator=gen(8), perm=perm)
    from_self = mixed == ids
    assert bool((from_self | (mixed == ids[perm])).all())
    assert torch.equal(mixed_mask, torch.where(from_self, mask, mask[perm]).bool())
    assert abs(from_self.float().mean().item() - float(r)) < 0.05  # Bernoulli(r) per token (1600 draws)


def test_r_one_is_the_identity_and_zero_the_partner() -> None:
    ids, mask = text_batch()
    same, same_mask, r, _ = mix_tokens(ids, mask, generator=gen(9), r=1.0)
    assert torch.equal(same, ids) and torch.equal(same_mask, mask) and float(r) == 1.0
    partner, partner_mask, _, perm = mix_tokens(ids, mask, generator=gen(9), r=0.0)
    assert torch.equal(partner, ids[perm]) and torch.equal(partner_mask, mask[perm])


def test_token_draws_come_from_the_generator_only() -> None:
    ids, mask = text_batch(b=6, length=30)
    a = mix_tokens(ids, mask, generator=gen(11))
    b = mix_tokens(ids, mask, generator=gen(11))
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


def test_token_errors() -> None:
    ids, mask = text_batch()
    with pytest.raises(ValueError, match="integer ids"):
        mix_tokens(ids.float(), mask)
    with pytest.raises(ValueError, match="attention_mask must have the shape of ids"):
        mix_tokens(ids, mask[:, :-1])
    with pytest.raises(ValueError, match=r"r must lie in \[0, 1\]"):
        mix_tokens(ids, mask, r=-0.1)
