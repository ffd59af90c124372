"""DeepSTAPLE data parameters: the pure loss terms, the consensus rules and the two-step (OOL) update.

Invariants 5-12 of ``shared/methods/deepstaple.md`` §3 (Weihsbach et al., WBIR 2022).
"""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from medmodal.fusion import dp_consensus, majority_vote
from medmodal.losses.data_parameters import (
    batch_weights,
    class_weights,
    data_parameter_loss,
    fixed_divisor,
    foreground_fraction,
    per_sample_cross_entropy,
    risk_term,
)
from medmodal.methods.deepstaple.system import DeepStapleSystem, spearman
from medmodal.networks.registry import create_network


# -- consensus (invariants 5, 6) ------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [3, 4, 5])
def test_dp_consensus_with_equal_theta_is_the_strict_majority_vote(k: int) -> None:
    masks = torch.rand(k, 7, 8, 9, generator=torch.Generator().manual_seed(k)) > 0.5
    fused = dp_consensus(masks, torch.full((k,), 0.3))
    assert torch.equal(fused, majority_vote(masks))
    if k % 2 == 0:  # exact ties are background
        tie = masks.sum(0) * 2 == k
        assert tie.any() and not fused[tie].any()


def test_dp_consensus_follows_one_dominant_label() -> None:
    masks = torch.rand(4, 11, 13, generator=torch.Generator().manual_seed(0)) > 0.5
    assert torch.equal(dp_consensus(masks, torch.tensor([50.0, 0.0, 0.0, 0.0])), masks[0])
    assert torch.equal(dp_consensus(masks, torch.tensor([0.0, 0.0, 50.0, 0.0])), masks[2])


# -- weights and divisors (invariants 7, 8, 12) -----------------------------------------------------------
def test_zero_theta_gives_sigmoid_one_half_and_unit_weights() -> None:
    theta = torch.zeros(5)
    assert torch.equal(torch.sigmoid(theta), torch.full((5,), 0.5))
    assert torch.equal(batch_weights(theta), torch.ones(5))


def test_fixed_divisor_values() -> None:
    phi = fixed_divisor(torch.tensor([0, 1000]))
    assert phi[0].item() == pytest.approx(1 + math.e, abs=1e-6)
    assert phi[1].item() == pytest.approx(math.log(1000 + math.e) + math.e, abs=1e-5)
    assert phi[1].item() == pytest.approx(9.63, abs=5e-3)
    with pytest.raises(ValueError, match="non-negative"):
        fixed_divisor(torch.tensor([-1]))


def test_fixed_weighting_is_finite_for_an_empty_label() -> None:
    theta = torch.zeros(3, requires_grad=True)
    divisor = fixed_divisor(torch.tensor([0, 0, 250]))
    w = batch_weights(theta, divisor)
    assert torch.isfinite(w).all() and w[0].item() == pytest.approx(1 / (1 + math.e))
    loss = data_parameter_loss(theta, torch.tensor([0.0, 0.5, 0.2]), torch.tensor([0.0, 0.1, 0.3]), divisor=divisor)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(theta.grad).all()


def test_class_weights_follow_the_power_law_with_mean_one() -> None:
    w = class_weights(torch.tensor([10_000, 100]), exponent=0.35)
    assert w.mean().item() == pytest.approx(1.0)
    assert w[1] > w[0]  # the rarer class weighs more
    assert (w[1] / w[0]).item() == pytest.approx(100**0.35, rel=1e-5)
    assert torch.allclose(class_weights(torch.tensor([5, 7, 9]), exponent=0.0), torch.ones(3))


def test_class_weighted_cross_entropy_weights_each_voxel_by_its_class() -> None:
    logits = torch.randn(2, 2, 5, 6, generator=torch.Generator().manual_seed(0))
    target = (torch.rand(2, 5, 6, generator=torch.Generator().manual_seed(1)) > 0.7).long()
    weight = torch.tensor([0.5, 1.5])
    voxel = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    expected = (voxel * weight[target]).flatten(1).mean(1)
    assert torch.allclose(per_sample_cross_entropy(logits, target, weight=weight), expected)
    assert torch.allclose(per_sample_cross_entropy(logits, target[:, None]), voxel.flatten(1).mean(1))


# -- risk term (invariant 11) ---------------------------------------------------------------------------------
def test_risk_pushes_theta_up_for_more_predicted_foreground_and_carries_no_gradient_to_the_network() -> None:
    theta = torch.zeros(2, requires_grad=True)
    loss = data_parameter_loss(theta, torch.tensor([0.4, 0.4]), torch.tensor([0.05, 0.30]))
    loss.backward()
    assert theta.grad[1] < theta.grad[0]  # gradient descent raises θ_1 more
    logits = torch.randn(2, 2, 4, 5, requires_grad=True)
    fg = foreground_fraction(logits)
    assert not fg.requires_grad
    assert fg.tolist() == (logits.argmax(1) != 0).flatten(1).float().mean(1).tolist()
    w = batch_weights(torch.zeros(2, requires_grad=True))
    risk_term(w, fg).backward()
    assert logits.grad is None


def test_risk_term_is_off_when_disabled() -> None:
    theta = torch.zeros(2)
    loss = torch.tensor([0.3, 0.1])
    on = data_parameter_loss(theta, loss, torch.tensor([0.5, 0.5]), risk=True)
    off = data_parameter_loss(theta, loss, torch.tensor([0.5, 0.5]), risk=False)
    assert off.item() == pytest.approx(0.4) and on.item() == pytest.approx(0.4 - 1.0)


def test_spearman_ignores_unknown_quality() -> None:
    assert spearman([1, 2, 3, 4], [0.1, 0.2, float("nan"), 0.9]) == pytest.approx(1.0)
    assert math.isnan(spearman([1, 2], [1, 2]))


# -- the two-step update in a Lightning loop (invariants 9, 10) -----------------------------------------------
class _Samples(Dataset):
    def __init__(self, shape: tuple[int, ...], n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, 1, *shape, generator=g)
        self.labels = (torch.rand(n, *shape, generator=g) > torch.linspace(0.2, 0.9, n).view(n, *[1] * len(shape)))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "available": torch.ones(1, dtype=torch.bool),
                "label": self.labels[i].long(), "label_id": torch.tensor(i)}


def _system(shape: tuple[int, ...], dp_update: str, n_labels: int = 6) -> DeepStapleSystem:
    torch.manual_seed(0)
    net = create_network("unet", spatial_dims=len(shape), modalities=["t2"], out_channels=2, channels=[4, 8])
    return DeepStapleSystem(network=net, foreground_voxels=[0, 5, 20, 40, 80, 100][:n_labels],
                            class_voxels=[900, 100], dp_update=dp_update, roi_size=shape, lr=0.01)


def _fit_one_step(system: DeepStapleSystem, shape: tuple[int, ...], batch: int = 4) -> None:
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", limit_val_batches=0)
    trainer.fit(system, train_dataloaders=DataLoader(_Samples(shape, batch), batch_size=batch))
    assert trainer.global_step == 1  # the θ step is not counted as an optimiser step


def _params(system: DeepStapleSystem) -> list[torch.Tensor]:
    return [p.detach().clone() for p in system.network.parameters()]


@pytest.mark.parametrize("shape", [(17, 18), (9, 10, 11)])
def test_ool_isolates_the_network_from_theta_and_updates_only_the_batch_rows(shape: tuple[int, ...]) -> None:
    system = _system(shape, "ool")
    snap: dict[str, object] = {}
    model_step, dp_step = system.model_step, system.dp_step

    def spy_model(batch: dict) -> torch.Tensor:
        snap["net0"], snap["theta0"] = _params(system), system.theta
        out = model_step(batch)
        snap["net1"], snap["theta1"] = _params(system), system.theta
        return out

    def spy_dp(batch: dict) -> torch.Tensor:
        out = dp_step(batch)
        snap["net2"], snap["theta2"], snap["ids"] = _params(system), system.theta, batch["label_id"].clone()
        return out

    system.model_step, system.dp_step = spy_model, spy_dp  # type: ignore[method-assign]
    _fit_one_step(system, shape)
    assert any(not torch.equal(a, b) for a, b in zip(snap["net0"], snap["net1"], strict=True))
    assert torch.equal(snap["theta0"], snap["theta1"])  # the model step leaves θ alone
    assert all(torch.equal(a, b) for a, b in zip(snap["net1"], snap["net2"], strict=True))  # bit-identical
    changed = snap["theta2"] != snap["theta1"]
    batch_rows = torch.zeros(6, dtype=torch.bool)
    batch_rows[snap["ids"]] = True
    assert torch.equal(changed, batch_rows)  # sparse: exactly the batch's rows moved


def test_inline_updates_network_and_theta_together() -> None:
    shape = (17, 18)
    system = _system(shape, "inline")
    net0, theta0 = _params(system), system.theta
    _fit_one_step(system, shape)
    assert any(not torch.equal(a, b) for a, b in zip(net0, _params(system), strict=True))
    changed = system.theta != theta0
    assert changed[:4].all() and not changed[4:].any()


def test_optimisers_are_adamw_and_sparse_adam_on_theta_only() -> None:
    system = _system((17, 18), "ool")
    (opt, theta_opt), scheds = system.configure_optimizers()
    assert isinstance(opt, torch.optim.AdamW) and isinstance(theta_opt, torch.optim.SparseAdam)
    assert theta_opt.param_groups[0]["lr"] == 0.1 and theta_opt.param_groups[0]["params"] == [
        system.data_parameters.weight]
    assert system.data_parameters.sparse and torch.equal(system.theta, torch.zeros(6))
    assert {id(p) for p in opt.param_groups[0]["params"]} == {id(p) for p in system.network.parameters()}


def test_bad_settings_are_refused() -> None:
    net = create_network("unet_tiny", spatial_dims=2, modalities=["t2"], out_channels=2)
    with pytest.raises(ValueError, match="dp_update"):
        DeepStapleSystem(network=net, foreground_voxels=[1], class_voxels=[1, 1], dp_update="both", roi_size=(8, 8))
    with pytest.raises(ValueError, match="true_dice"):
        DeepStapleSystem(network=net, foreground_voxels=[1, 2], class_voxels=[1, 1], true_dice=[0.5],
                         roi_size=(8, 8))


def test_faithful_decay_steps_only_in_every_kth_epoch() -> None:
    shape = (17, 18)
    torch.manual_seed(0)
    net = create_network("unet", spatial_dims=2, modalities=["t2"], out_channels=2, channels=[4, 8])
    system = DeepStapleSystem(network=net, foreground_voxels=[5, 20, 40, 80], class_voxels=[900, 100], lr=0.01,
                              lr_decay="faithful", lr_gamma=0.5, lr_decay_every=2, roi_size=shape)
    trainer = L.Trainer(max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", limit_val_batches=0)
    trainer.fit(system, train_dataloaders=DataLoader(_Samples(shape, 4), batch_size=2))  # 2 batches per epoch
    assert trainer.current_epoch == 3
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(0.01 * 0.5**4)  # epochs 0 and 2 decay per batch, epoch 1 does not
