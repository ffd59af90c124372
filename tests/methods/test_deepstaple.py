"""DeepSTAPLE data parameters: the pure loss terms, the consensus rules and the two-step (OOL) update.

Invariants 5-12 of ``shared/methods/deepstaple.md`` §3 (Weihsbach et al., WBIR 2022).
"""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
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
from medmodal.methods.deepstaple.config import DeepStapleMethod
from medmodal.methods.deepstaple.labels import CandidateLabel, DeepStapleDataModule, LabelSet, TargetImage
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
    return DeepStapleSystem(network=net, foreground_voxels=[0, 5, 20, 40, 80, 100, 7][:n_labels],
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


class _LrPerEpoch(L.Callback):
    """The network's learning rate at the end of every epoch."""

    def __init__(self) -> None:
        self.lr: list[float] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.lr.append(trainer.optimizers[0].param_groups[0]["lr"])


def _lr_run(epochs: int, **kwargs: object) -> list[float]:
    """Train 2 batches per epoch for ``epochs`` epochs; the learning rate after each epoch."""
    shape = (17, 18)
    torch.manual_seed(0)
    net = create_network("unet", spatial_dims=2, modalities=["t2"], out_channels=2, channels=[4, 8])
    system = DeepStapleSystem(network=net, foreground_voxels=[5, 20, 40, 80], class_voxels=[900, 100], lr=0.01,
                              roi_size=shape, **kwargs)
    seen = _LrPerEpoch()
    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", limit_val_batches=0, callbacks=[seen])
    trainer.fit(system, train_dataloaders=DataLoader(_Samples(shape, 4), batch_size=2))
    return seen.lr


def test_default_lr_decay_is_the_official_every_kth_epoch_schedule() -> None:
    """Spec §2.6/§2.7: ExponentialLR(0.99) stepped every batch, only in epochs 0, 10, 20, ... (k = 10)."""
    assert DeepStapleMethod().lr_decay == "every_kth_epoch_per_batch"
    lr = _lr_run(12)  # the defaults: lr_gamma 0.99, lr_decay_every 10
    assert lr[0] == pytest.approx(0.01 * 0.99**2)  # epoch 0: both batches decay
    assert lr[9] == pytest.approx(0.01 * 0.99**2)  # epochs 1-9: none
    assert lr[10] == pytest.approx(0.01 * 0.99**4) and lr[11] == lr[10]  # epoch 10 decays again


@pytest.mark.parametrize(("lr_decay", "factor"), [("every_kth_epoch_per_batch", 0.5**4), ("per_epoch", 0.5**3),
                                                  ("per_batch", 0.5**6), ("schedule", 1.0)])
def test_each_lr_decay_gives_its_learning_rate(lr_decay: str, factor: float) -> None:
    # 3 epochs of 2 batches, gamma 0.5, k = 2: decays in epochs 0 and 2 (4 batches), per epoch (3), every batch
    # (6); "schedule" follows train.schedule (here constant)
    lr = _lr_run(3, lr_decay=lr_decay, lr_gamma=0.5, lr_decay_every=2, schedule="constant")
    assert lr[-1] == pytest.approx(0.01 * factor)


def test_faithful_is_read_as_every_kth_epoch_per_batch() -> None:
    assert DeepStapleMethod(lr_decay="faithful").lr_decay == "every_kth_epoch_per_batch"


# -- model step cross-entropy normalisation -----------------------------------------------------------------
def _two_batches(shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits ``(2, 2, *S)`` and two label batches ``(2, *S)``: about 10 % and 60 % foreground."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 2, *shape, generator=g)
    u = torch.rand(2, *shape, generator=g)
    return logits, (u < 0.1).long(), (u < 0.6).long()


@pytest.mark.parametrize("shape", [(17, 18), (9, 10, 11)])
def test_model_step_ce_is_normalised_by_the_sum_of_the_class_weights(shape: tuple[int, ...]) -> None:
    """Spec §2.3 [code]: nn.CrossEntropyLoss(weight=w), i.e. Σ w_y ℓ / Σ w_y; voxel_mean is Σ w_y ℓ / #voxels."""
    assert DeepStapleMethod().ce_normalisation == "weight_sum"
    by_sum, by_voxels = _system(shape, "ool"), _system(shape, "ool")
    by_voxels.ce_normalisation = "voxel_mean"
    w = by_sum.class_weight
    logits, sparse, dense = _two_batches(shape)
    for label in (sparse, dense):
        voxel = F.cross_entropy(logits, label, reduction="none")
        assert by_sum.model_loss(logits, label).item() == pytest.approx(
            F.cross_entropy(logits, label, weight=w).item(), rel=1e-6)
        assert by_sum.model_loss(logits, label).item() == pytest.approx(
            ((w[label] * voxel).sum() / w[label].sum()).item(), rel=1e-6)
        assert by_voxels.model_loss(logits, label).item() == pytest.approx((w[label] * voxel).mean().item(),
                                                                            rel=1e-6)
    # uninformative logits: every voxel costs ln 2; weight_sum keeps that scale whatever the foreground share,
    # voxel_mean scales it by the batch's mean class weight w0 (1 - f) + w1 f
    flat = torch.zeros_like(logits)
    for label in (sparse, dense):
        f = label.float().mean().item()
        assert by_sum.model_loss(flat, label).item() == pytest.approx(math.log(2), rel=1e-6)
        assert by_voxels.model_loss(flat, label).item() == pytest.approx(
            math.log(2) * (w[0].item() * (1 - f) + w[1].item() * f), rel=1e-6)
    assert by_voxels.model_loss(flat, dense) > 1.5 * by_voxels.model_loss(flat, sparse)


def test_bad_ce_normalisation_is_refused() -> None:
    net = create_network("unet_tiny", spatial_dims=2, modalities=["t2"], out_channels=2)
    with pytest.raises(ValueError, match="ce_normalisation"):
        DeepStapleSystem(network=net, foreground_voxels=[1], class_voxels=[1, 1], ce_normalisation="mean",
                         roi_size=(8, 8))


# -- drop_last: a batch of one sample teaches its θ nothing --------------------------------------------------
def test_a_batch_of_one_gives_its_theta_no_gradient() -> None:
    """w_b = σ(θ_b) / mean σ(θ) is 1 for a batch of one, whatever θ_b: L_dp does not depend on θ_b."""
    for n, zero in ((1, True), (2, False)):
        theta = torch.full((n,), 0.3, requires_grad=True)
        data_parameter_loss(theta, torch.linspace(0.2, 0.6, n), torch.linspace(0.1, 0.3, n),
                            divisor=fixed_divisor(torch.full((n,), 50))).backward()
        assert bool((theta.grad == 0).all()) == zero


def _odd_data(drop_last: bool, n: int = 7, shape: tuple[int, ...] = (9, 10)) -> DeepStapleDataModule:
    g = np.random.default_rng(0)
    targets = {f"t{i}": TargetImage(f"t{i}", g.standard_normal((1, *shape)).astype(np.float32), np.ones(1, bool),
                                    np.eye(4), shape, None) for i in range(n)}
    labels = [CandidateLabel(f"t{i}", "a", g.random(shape) < 0.1 + 0.1 * i) for i in range(n)]
    return DeepStapleDataModule(label_set=LabelSet(("t2",), targets, labels), train_ids=sorted(targets),
                                val_ids=[], patch_size=shape, batch_size=2, drop_last=drop_last)


def _theta_gradients(data: DeepStapleDataModule) -> list[dict[int, float]]:
    """``{label id: θ gradient}`` of every DP step of one epoch."""
    system = _system((9, 10), "ool", n_labels=len(data.train_labels))
    steps: list[dict[int, float]] = []
    dp_step = system.dp_step

    def spy(batch: dict) -> torch.Tensor:
        out = dp_step(batch)
        grad = system.data_parameters.weight.grad.coalesce()
        steps.append(dict(zip(grad.indices()[0].tolist(), grad.values()[:, 0].tolist(), strict=True)))
        return out

    system.dp_step = spy  # type: ignore[method-assign]
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", limit_val_batches=0)
    trainer.fit(system, train_dataloaders=data.train_dataloader())
    return steps


def test_drop_last_default_gives_every_theta_step_a_gradient_on_an_odd_dataset() -> None:
    assert DeepStapleMethod().drop_last is True
    data = _odd_data(drop_last=True)
    assert data.batches_per_epoch == 3
    steps = _theta_gradients(data)
    assert [len(s) for s in steps] == [2, 2, 2]
    assert all(v != 0 for s in steps for v in s.values())  # every θ in every batch learns
    # the label left out changes with the epoch; within 3 epochs every label's θ has had its steps
    ds = data.train_dataloader().dataset.dataset
    seen = set()
    for epoch in range(3):
        ds.set_epoch(epoch)
        seen |= {int(ds[i]["label_id"]) for i in range(len(ds))}
    assert len(ds) == 6 and seen == set(range(7))


def test_without_drop_last_the_single_last_sample_gets_a_zero_theta_gradient() -> None:
    data = _odd_data(drop_last=False)
    assert data.batches_per_epoch == 4
    steps = _theta_gradients(data)
    assert [len(s) for s in steps] == [2, 2, 2, 1]
    assert sorted(i for s in steps for i in s) == list(range(7))  # every label is in a batch ...
    assert list(steps[-1].values()) == [0.0]  # ... but the last one's θ gets a zero gradient
    assert all(v != 0 for s in steps[:-1] for v in s.values())
