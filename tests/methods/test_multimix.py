"""MultiMix's own parts (spec ``shared/methods/multimix.md``): the five streams (invariant 7), splits and label
budgets, the training system's loss terms and §2.5 switches (invariants 2, 8, 9), model selection and the
eval-mode switch at inference. The generic train/resume/evaluate/predict contract is ``test_contract.py``'s; the
commands end to end are ``test_multimix_cli.py``'s.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from medmodal.data.case import DataError
from medmodal.methods.multimix.data import (
    Budget,
    ImageSet,
    ModelInput,
    StreamSteps,
    apply_budget,
    item_generator,
    load_image_set,
    make_splits,
    stream_positions,
)
from medmodal.methods.multimix.inference import predict_inputs
from medmodal.methods.multimix.selection import SELECTED, SelectedWeights, selected_network
from medmodal.methods.multimix.system import MultiMixSystem
from medmodal.networks.multimix import MultiMixNet
from medmodal.transforms.views import strong_views, weak_views

SIZE = (32, 32)


# -- helpers -------------------------------------------------------------------------------------------------------
def image_set(n: int = 30, *, sources: tuple[str, ...] = ("A", "B", "C"), size: tuple[int, ...] = (8, 9),
              mask_every: int = 1, target_every: int = 1) -> ImageSet:
    """``n`` images whose every pixel holds ``i / 1000`` (image ``i`` is recognisable after an identity view);
    case ``i`` comes from ``sources[i % len]``, has a mask when ``i % mask_every == 0`` and a class (``i % 2``)
    when ``i % target_every == 0``."""
    images = np.stack([np.full((1, *size), i / 1000.0, np.float32) for i in range(n)])
    has_mask = np.array([i % mask_every == 0 for i in range(n)])
    masks = np.zeros((n, 1, *size), np.uint8)
    masks[has_mask, 0, : size[0] // 2] = 1
    return ImageSet(case_ids=[f"c{i:03d}" for i in range(n)], sources=[sources[i % len(sources)] for i in range(n)],
                    images=images, available=np.ones((n, 1), bool), masks=masks, has_mask=has_mask,
                    targets=np.array([i % 2 if i % target_every == 0 else -1 for i in range(n)], np.int64))


def identity(x: torch.Tensor, generator: torch.Generator | None = None, mask: torch.Tensor | None = None) -> Any:
    return (x, None) if mask is None else (x, None, mask)


def decode(images: torch.Tensor) -> list[int]:
    """The image indices of ``image_set`` images ``(B, 1, *S)`` (identity views)."""
    return [round(float(v) * 1000) for v in images[:, 0].flatten(1).mean(1)]


def budget_of(data: ImageSet, unlabelled: int = 7) -> Budget:
    idx = np.arange(len(data))
    return Budget(seg_labelled=idx[:3], seg_unlabelled=idx[3:8], cls_labelled=idx[8:13],
                  cls_unlabelled=idx[13:13 + unlabelled])


def steps(data: ImageSet, budget: Budget, *, world: int = 1, rank: int = 0, reshuffle: bool = True,
          weak: Any = identity, strong: Any = identity, batch: int = 4, seed: int = 5) -> StreamSteps:
    return StreamSteps(data=data, budget=budget, batch_size=batch, steps_per_epoch=3, rank=rank, world_size=world,
                       seed=seed, reshuffle=reshuffle, weak=weak, strong=strong, seg_augment=False)


def tiny_net(*, dropout: float = 0.0, classify: bool = True, segment: bool = True, bridge: bool = True,
             restore: bool = True) -> MultiMixNet:
    torch.manual_seed(0)
    return MultiMixNet(spatial_dims=2, modalities=("xray",), out_channels=1, num_classes=2, channels=(4, 8, 16, 32),
                       dropout=dropout, classify=classify, segment=segment, saliency_bridge=bridge and segment,
                       restore_mode_after_saliency=restore)


def five_streams(b: int = 4, *, seed: int = 0, size: tuple[int, ...] = SIZE) -> dict[str, torch.Tensor]:
    """A training batch as :class:`StreamSteps` gives it: ``b`` images per stream in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)

    def img() -> torch.Tensor:
        return torch.rand(b, 1, *size, generator=g) * 2 - 1

    yes = torch.ones(b, 1, dtype=torch.bool)
    mask = torch.zeros(b, 1, *size)
    mask[:, :, 4:20, 6:26] = 1.0
    return {"seg_labelled_image": img(), "seg_labelled_mask": mask, "seg_labelled_available": yes,
            "seg_unlabelled_image": img(), "seg_unlabelled_available": yes,
            "cls_labelled_image": img(), "cls_labelled_target": torch.tensor([0, 1] * (b // 2)),
            "cls_labelled_available": yes, "cls_weak_image": img(), "cls_strong_image": img(),
            "cls_unlabelled_available": yes, "cls_unlabelled_index": torch.arange(b)}


def value(x: torch.Tensor) -> float:
    return float(x.detach())


def system(net: MultiMixNet | None = None, **kw: Any) -> MultiMixSystem:
    args: dict[str, Any] = {"classify": True, "segment": True, "semi_supervised": True, "channels_last": False}
    args.update(kw)
    return MultiMixSystem(network=net if net is not None else tiny_net(), **args)


# -- invariant 7: the streams ----------------------------------------------------------------------------------------
def test_stream_positions_walk_a_permutation_per_pass_and_reshuffle_only_when_asked() -> None:
    pool, batch, passes = 7, 3, 4
    n_steps = pool * passes // batch + 1
    for reshuffle in (True, False):
        walk = np.concatenate([stream_positions(s, batch, pool, seed=3, stream=3, reshuffle=reshuffle)
                               for s in range(n_steps)])
        chunks = [walk[p * pool:(p + 1) * pool] for p in range(passes)]
        for c in chunks:  # every pool index exactly once per pass
            assert sorted(c.tolist()) == list(range(pool))
        orders = {tuple(c.tolist()) for c in chunks}
        assert len(orders) == (passes if reshuffle else 1), (reshuffle, chunks)
    # another stream or seed walks another order; the same arguments give the same batch
    a = stream_positions(2, batch, pool, seed=3, stream=3, reshuffle=True)
    np.testing.assert_array_equal(a, stream_positions(2, batch, pool, seed=3, stream=3, reshuffle=True))
    first = [stream_positions(s, batch, pool, seed=3, stream=3, reshuffle=True) for s in range(2)]
    assert not np.array_equal(np.concatenate(first),
                              np.concatenate([stream_positions(s, batch, pool, seed=3, stream=2, reshuffle=True)
                                              for s in range(2)]))
    assert not np.array_equal(np.concatenate(first),
                              np.concatenate([stream_positions(s, batch, pool, seed=4, stream=3, reshuffle=True)
                                              for s in range(2)]))


@pytest.mark.parametrize("reshuffle", [True, False])
def test_weak_and_strong_views_come_from_the_same_pool_index_every_epoch(reshuffle: bool) -> None:
    data = image_set()
    budget = budget_of(data)
    ds = steps(data, budget, reshuffle=reshuffle)
    seen: list[list[int]] = []
    for epoch in range(4):  # 3 steps × 4 items = 12 draws per epoch over a pool of 7: passes end mid-batch
        ds.set_epoch(epoch)
        order = []
        for j in range(len(ds)):
            item = ds[j]
            idx = item["cls_unlabelled_index"].tolist()
            assert decode(item["cls_weak_image"]) == idx
            assert decode(item["cls_strong_image"]) == idx
            assert set(idx) <= set(budget.cls_unlabelled.tolist())
            assert all(t == i % 2 for t, i in zip(item["cls_labelled_target"].tolist(),
                                                  decode(item["cls_labelled_image"]), strict=True))
            order += idx
        seen.append(order)
    walk = sum(seen, [])
    passes = [walk[p * 7:(p + 1) * 7] for p in range(len(walk) // 7)]
    assert all(sorted(p) == list(range(13, 20)) for p in passes)
    assert (len({tuple(p) for p in passes}) > 1) == reshuffle


def test_views_are_applied_to_the_indexed_image_with_the_items_generator() -> None:
    rng = np.random.default_rng(0)
    data = image_set(size=SIZE)
    data.images[:] = rng.uniform(-1, 1, data.images.shape).astype(np.float32)  # distinct content per image
    weak, strong = weak_views(spatial_dims=2, size=SIZE), strong_views(spatial_dims=2, size=SIZE)
    ds = steps(data, budget_of(data), weak=weak, strong=strong, seed=9)
    ds.set_epoch(2)
    for j in range(len(ds)):
        step = 2 * len(ds) + j
        item = ds[j]
        for k, i in enumerate(item["cls_unlabelled_index"].tolist()):
            x = torch.from_numpy(np.array(data.images[i]))
            torch.testing.assert_close(item["cls_weak_image"][k], weak(x, item_generator(9, step, 3, k))[0])
            torch.testing.assert_close(item["cls_strong_image"][k], strong(x, item_generator(9, step, 4, k))[0])
        assert not torch.equal(item["cls_weak_image"], item["cls_strong_image"])


def test_two_ranks_together_draw_the_global_batch_of_one() -> None:
    data = image_set(size=SIZE)
    budget = budget_of(data)
    weak, strong = weak_views(spatial_dims=2, size=SIZE), strong_views(spatial_dims=2, size=SIZE)
    whole = steps(data, budget, weak=weak, strong=strong)
    halves = [steps(data, budget, world=2, rank=r, weak=weak, strong=strong) for r in range(2)]
    for ds in (whole, *halves):
        ds.set_epoch(1)
    for j in range(len(whole)):
        one, parts = whole[j], [h[j] for h in halves]
        assert set(one) == set(parts[0]) == set(parts[1])
        assert parts[0]["cls_strong_image"].shape[0] == 2
        for key in one:
            torch.testing.assert_close(torch.cat([p[key] for p in parts]), one[key], rtol=0, atol=0)


# -- splits and budgets ----------------------------------------------------------------------------------------------
def test_splits_keep_cross_sources_out_and_partition_the_rest() -> None:
    data = image_set(40)
    s = make_splits(data, cross_sources=["C"], val_fraction=0.15, test_fraction=0.2, seed=0)
    in_source = {c for c, src in zip(data.case_ids, data.sources, strict=True) if src != "C"}
    assert set(s["cross_source"]) == {c for c, src in zip(data.case_ids, data.sources, strict=True) if src == "C"}
    train, val, test = set(s["train"]), set(s["val"]), set(s["test"])
    assert not (train & val or train & test or val & test)
    assert train | val | test == in_source
    assert len(in_source) == 27
    assert (len(test), len(val), len(train)) == (5, 4, 18)  # round(0.2·27), round(0.15·27), the rest
    assert s == make_splits(data, cross_sources=["C"], val_fraction=0.15, test_fraction=0.2, seed=0)
    other = make_splits(data, cross_sources=["C"], val_fraction=0.15, test_fraction=0.2, seed=1)
    assert other["test"] != s["test"] and other["cross_source"] == s["cross_source"]


def test_budgets_draw_labels_among_labelled_images_and_leave_the_rest_unlabelled() -> None:
    data = image_set(60, mask_every=3, target_every=2)
    train = make_splits(data, cross_sources=[], val_fraction=0.1, test_fraction=0.1, seed=0)["train"]
    t = set(data.index_of(train).tolist())
    b = apply_budget(data, train, seg_labels=4, cls_labels=6, segment=True, classify=True, semi_supervised=True,
                     seed=0)
    assert b.counts() == {"seg_labelled": 4, "seg_unlabelled": len(t) - 4, "cls_labelled": 6,
                          "cls_unlabelled": len(t) - 6}
    assert all(data.has_mask[i] and i in t for i in b.seg_labelled)
    assert all(data.targets[i] >= 0 and i in t for i in b.cls_labelled)
    assert set(b.seg_unlabelled.tolist()) == t - set(b.seg_labelled.tolist())
    assert set(b.cls_unlabelled.tolist()) == t - set(b.cls_labelled.tolist())
    again = apply_budget(data, train, seg_labels=4, cls_labels=6, segment=True, classify=True, semi_supervised=True,
                         seed=0)
    np.testing.assert_array_equal(b.seg_labelled, again.seg_labelled)
    np.testing.assert_array_equal(b.cls_labelled, again.cls_labelled)
    other = apply_budget(data, train, seg_labels=4, cls_labels=6, segment=True, classify=True, semi_supervised=True,
                         seed=1)
    assert not np.array_equal(b.cls_labelled, other.cls_labelled)
    # no semi-supervision: no unlabelled pools; a task not trained: no pools of it
    sup = apply_budget(data, train, seg_labels=4, cls_labels=6, segment=True, classify=False,
                       semi_supervised=False, seed=0)
    assert sup.counts() == {"seg_labelled": 4, "seg_unlabelled": 0, "cls_labelled": 0, "cls_unlabelled": 0}


def test_all_budgets_use_every_training_image_as_unlabelled_too() -> None:
    data = image_set(20)
    train = data.case_ids[:12]
    b = apply_budget(data, train, seg_labels="all", cls_labels="all", segment=True, classify=True,
                     semi_supervised=True, seed=0)
    for pool in (b.seg_labelled, b.seg_unlabelled, b.cls_labelled, b.cls_unlabelled):
        assert pool.tolist() == list(range(12))


def test_split_and_budget_errors_name_the_field() -> None:
    data = image_set(30)
    with pytest.raises(DataError) as err:
        make_splits(data, cross_sources=["Z", "A"], val_fraction=0.1, test_fraction=0.2, seed=0)
    assert "method.cross_sources: ['Z']" in str(err.value) and "['A', 'B', 'C']" in str(err.value)
    train = data.case_ids[:10]
    for kw, field in (({"seg_labels": 11, "cls_labels": 2}, "method.seg_labels"),
                      ({"seg_labels": 2, "cls_labels": 11}, "method.cls_labels")):
        with pytest.raises(DataError, match=rf"{field}: 11 labelled images asked for, but only 10 "):
            apply_budget(data, train, segment=True, classify=True, semi_supervised=True, seed=0, **kw)
    no_masks = image_set(30, mask_every=10**6)  # only image 0 has a mask, and it is not in training
    with pytest.raises(DataError, match="no training image keeps a mask"):
        apply_budget(no_masks, no_masks.case_ids[1:11], seg_labels="all", cls_labels="all", segment=True,
                     classify=True, semi_supervised=True, seed=0)
    # the classifier-only variant does not need masks
    b = apply_budget(no_masks, no_masks.case_ids[1:11], seg_labels="all", cls_labels="all", segment=False,
                     classify=True, semi_supervised=False, seed=0)
    assert b.counts()["cls_labelled"] == 10


def test_image_set_cache_round_trip_gives_plain_strings(tmp_path: Path) -> None:
    """The cache gives the same arrays, memory-mapped (DataLoader workers share them), and ids/sources as ``str``
    (not ``np.str_``, whose repr ``np.str_('A')`` leaked into the unknown-cross-source message)."""
    from medmodal.data.formats import open_dataset
    from medmodal.data.phantom_xray import write_chest_phantom

    root = write_chest_phantom(tmp_path / "ph", cases=6, size=32, sources=3)
    info, records = open_dataset(root / "manifest.csv")
    kw: dict[str, Any] = {"modalities": ["xray"], "regions": {"lung": (1,)}, "image_size": SIZE,
                          "percentiles": (0.5, 99.5), "cache_dir": tmp_path / "cache"}
    fresh = load_image_set(records, info, **kw)
    assert len(list((tmp_path / "cache").glob("multimix-*/meta.json"))) == 1
    cached = load_image_set(records, info, **kw)
    assert isinstance(cached.images, np.memmap) and not cached.images.flags.writeable
    for a in (fresh, cached):
        assert a.sources == ["A", "B", "C", "A", "B", "C"] and all(type(s) is str for s in a.sources + a.case_ids)
        assert a.images.shape == (6, 1, *SIZE) and a.images.min() >= -1 and a.images.max() <= 1
        assert a.has_mask.all() and set(np.unique(a.masks)) == {0, 1}
    for name in ("images", "masks", "targets", "available", "has_mask"):
        np.testing.assert_array_equal(getattr(fresh, name), getattr(cached, name))
    with pytest.raises(DataError, match=r"it has \['A', 'B', 'C'\]"):
        make_splits(cached, cross_sources=["Z"], val_fraction=0.2, test_fraction=0.2, seed=0)


# -- the training system -------------------------------------------------------------------------------------------
def test_loss_is_the_weighted_sum_and_a_zero_weight_drops_its_term() -> None:
    batch = five_streams()
    t = system().losses(batch)
    expected = t["cls"] + 5.0 * t["dice"] + 0.25 * t["fixmatch"] + 0.01 * t["kl"]
    torch.testing.assert_close(t["loss"], expected)
    assert t["dice"] > 0.1 and t["kl"] > 0 and t["cls"] > 0
    t0 = system(weight_dice=0.0).losses(batch)
    torch.testing.assert_close(t0["dice"], t["dice"])  # still logged
    torch.testing.assert_close(t0["loss"], t["cls"] + 0.25 * t["fixmatch"] + 0.01 * t["kl"])
    assert float((t["loss"] - t0["loss"]).detach()) == pytest.approx(5.0 * value(t["dice"].detach()), rel=1e-5)


def test_seg_kl_switch_changes_the_loss_by_exactly_the_weighted_kl() -> None:
    from medmodal.losses.multimix import segmentation_kl

    batch = five_streams()
    net = tiny_net()
    t = {mode: system(net, seg_kl=mode, weight_kl=0.5).losses(batch) for mode in ("bernoulli", "none",
                                                                                  "faithful_zero")}
    assert value(t["bernoulli"]["kl"].detach()) > 1e-4
    assert value(t["none"]["kl"]) == 0.0 and value(t["faithful_zero"]["kl"]) == 0.0
    torch.testing.assert_close(t["bernoulli"]["loss"] - t["none"]["loss"], 0.5 * t["bernoulli"]["kl"])
    torch.testing.assert_close(t["faithful_zero"]["loss"], t["none"]["loss"])
    # the KL pairs the labelled images' predictions with the unlabelled images'
    out = net.multitask(torch.cat([batch["seg_labelled_image"], batch["seg_unlabelled_image"]]),
                        torch.ones(8, 1, dtype=torch.bool))
    torch.testing.assert_close(t["bernoulli"]["kl"], segmentation_kl(out.seg_logits[:4], out.seg_logits[4:],
                                                                     mode="bernoulli"))


def test_weak_view_gives_no_gradient_and_runs_without_autograd(monkeypatch: pytest.MonkeyPatch) -> None:
    net = tiny_net()
    sys_ = system(net, tau=0.01)  # every unlabelled image confident: the FixMatch term is on
    batch = five_streams()
    weak = batch["cls_weak_image"].clone().requires_grad_(True)
    strong = batch["cls_strong_image"].clone().requires_grad_(True)
    batch.update(cls_weak_image=weak, cls_strong_image=strong)
    calls: list[tuple[torch.Tensor, bool]] = []
    classify = net.classify

    def spy(image: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        calls.append((image.detach().clone(), torch.is_grad_enabled()))
        return classify(image, available)

    monkeypatch.setattr(net, "classify", spy)
    t = sys_.losses(batch)
    assert value(t["confident"]) == 1.0 and value(t["fixmatch"]) > 0
    t["loss"].backward()
    assert weak.grad is None or not weak.grad.any()
    assert strong.grad is not None and strong.grad.abs().sum() > 0
    weak_calls = [grad for x, grad in calls if x.shape == weak.shape and torch.equal(x, weak.detach())]
    assert weak_calls == [False]  # the weak view ran once, under no_grad


def test_fixmatch_norm_confident_divides_by_the_confident_images_only() -> None:
    net = tiny_net()
    batch = five_streams()
    with torch.no_grad():
        p = net.classify(batch["cls_weak_image"], batch["cls_unlabelled_available"]).softmax(1).amax(1)
    top = p.sort(descending=True).values
    assert float(top[1] - top[2]) > 1e-6, top
    tau = float(top[1] + top[2]) / 2  # exactly two of the four unlabelled images are confident
    t = {norm: system(net, tau=tau, fixmatch_norm=norm).losses(batch) for norm in ("batch", "confident")}
    assert value(t["batch"]["confident"]) == 0.5
    assert value(t["batch"]["fixmatch"]) > 0
    torch.testing.assert_close(t["confident"]["fixmatch"], 2.0 * t["batch"]["fixmatch"])


@pytest.mark.parametrize("scaling", ["unified", "faithful"])
def test_input_scaling_faithful_feeds_unit_range_to_the_classifier_streams(monkeypatch: pytest.MonkeyPatch,
                                                                           scaling: str) -> None:
    net = tiny_net()
    batch = five_streams()
    seen: dict[str, list[torch.Tensor]] = {"classify": [], "multitask": []}
    for name in seen:
        original = getattr(net, name)

        def spy(image: torch.Tensor, available: torch.Tensor, _f: Any = original, _n: str = name) -> Any:
            seen[_n].append(image.detach().clone())
            return _f(image, available)

        monkeypatch.setattr(net, name, spy)
    system(net, input_scaling=scaling).losses(batch)
    cls_in = torch.cat([batch["cls_labelled_image"], batch["cls_strong_image"], batch["cls_weak_image"]])
    want = (cls_in + 1) / 2 if scaling == "faithful" else cls_in
    torch.testing.assert_close(torch.cat(seen["classify"]), want)
    assert float(torch.cat(seen["classify"]).min()) >= (0.0 if scaling == "faithful" else -1.0)
    # the segmentation streams stay in [-1, 1] either way (the released code's Normalize(0.5, 0.5))
    torch.testing.assert_close(torch.cat(seen["multitask"]),
                               torch.cat([batch["seg_labelled_image"], batch["seg_unlabelled_image"]]))


def test_one_full_step_gives_every_parameter_a_gradient() -> None:
    net = tiny_net(dropout=0.25)
    system(net, tau=0.01).losses(five_streams())["loss"].backward()
    names = [n for n, _ in net.named_parameters()]
    assert any(n.startswith("decoder.") for n in names) and any(n.startswith("cls_head.") for n in names)
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_classifier_only_variant_builds_no_decoder_and_trains_every_parameter() -> None:
    from medmodal.engine.recipe import recipe_from_dict
    from medmodal.methods.multimix import network_settings
    from medmodal.networks.registry import create_network

    def settings(variant: str) -> dict[str, Any]:
        recipe = recipe_from_dict({"data": {"phantom": {"kind": "chest_xray", "spatial_dims": 2},
                                            "patch_size": [32, 32]},
                                   "model": {"name": "multimix_unet_tiny", "kwargs": {}},
                                   "method": {"name": "multimix", "variant": variant, "image_size": [32, 32]}})
        return network_settings(recipe, ["xray"], regions=1, classes=2)

    assert (settings("enc")["classify"], settings("enc")["segment"]) == (True, False)
    assert settings("umtl")["saliency_bridge"] is False and settings("multimix")["saliency_bridge"] is True
    assert settings("unet")["classify"] is False
    torch.manual_seed(0)
    net = create_network("multimix_unet_tiny", **settings("enc"))
    assert net.decoder is None and net.seg_head is None
    assert not any(n.startswith(("decoder.", "seg_head.")) for n, _ in net.named_parameters())
    batch = {k: v for k, v in five_streams().items() if k.startswith("cls_labelled")}
    t = system(net, segment=False, semi_supervised=False).losses(batch)
    assert set(t) == {"cls", "fixmatch", "loss"} and value(t["fixmatch"]) == 0.0
    torch.testing.assert_close(t["loss"], t["cls"])
    t["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_lr_decay_multipliers() -> None:
    step = system(lr_decay="step", lr_step_epochs=2.0, lr_gamma=0.1, max_steps=100)
    step._trainer = SimpleNamespace(datamodule=SimpleNamespace(unlabelled_epoch_steps=5))  # type: ignore[assignment]
    step.setup("fit")
    assert step.decay_steps == 10  # 2 passes of 5 steps over the unlabelled classification images
    assert [step.lr_multiplier(s) for s in (0, 9, 10, 19, 20)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    cos = system(lr_decay="cosine", max_steps=100)
    assert [cos.lr_multiplier(s) for s in (0, 25, 50, 100, 150)] == pytest.approx(
        [1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.0, 0.0], abs=1e-12)
    none = system(lr_decay="none", max_steps=100)
    assert {none.lr_multiplier(s) for s in (0, 50, 500)} == {1.0}


# -- model selection ---------------------------------------------------------------------------------------------
def fake_trainer(root: Path, score: float | None, step: int, *, sanity: bool = False) -> Any:
    metrics = {} if score is None else {"val/score": torch.tensor(score)}
    return SimpleNamespace(sanity_checking=sanity, callback_metrics=metrics, global_step=step, global_rank=0,
                           default_root_dir=str(root))


def set_weights(net: MultiMixNet, value: float) -> None:
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(value)


def selected_state(root: Path) -> tuple[dict[str, Any], float]:
    from medmodal.engine.run import load_network

    doc = json.loads((root / SELECTED / "selected.json").read_text(encoding="utf-8"))
    return doc, value(next(load_network(root / SELECTED).parameters()).flatten()[0])


KW = {"spatial_dims": 2, "modalities": ["xray"], "out_channels": 1, "num_classes": 2}


@pytest.mark.parametrize("rule", ["validation", "first", "last"])
def test_selected_weights_rules(tmp_path: Path, rule: str) -> None:
    from medmodal.networks.registry import create_network

    net = create_network("multimix_unet_tiny", **KW)
    module = SimpleNamespace(network=net)
    cb = SelectedWeights(rule=rule, name="multimix_unet_tiny", kwargs=KW)
    set_weights(net, 9.0)
    cb.on_validation_end(fake_trainer(tmp_path, 5.0, 0, sanity=True), module)  # the sanity check never counts
    cb.on_validation_end(fake_trainer(tmp_path, None, 1), module)  # no score: nothing
    assert not (tmp_path / SELECTED).exists()
    for value, (score, step) in enumerate([(0.5, 2), (0.3, 4), (0.9, 6), (0.9, 8)], start=1):
        set_weights(net, float(value))
        cb.on_validation_end(fake_trainer(tmp_path, score, step), module)
    if rule == "last":
        assert not (tmp_path / SELECTED).exists()
        return
    doc, weight = selected_state(tmp_path)
    if rule == "validation":  # the best score (a tie keeps the earlier)
        assert (doc["step"], doc["val_score"], weight, cb.best) == (6, pytest.approx(0.9), 3.0, pytest.approx(0.9))
    else:  # the first validation's weights stick
        assert (doc["step"], doc["val_score"], weight) == (2, 0.5, 1.0)
    assert doc["rule"] == rule


def test_selected_weights_resume_against_the_same_best_and_selected_network(tmp_path: Path) -> None:
    from medmodal.engine.run import save_weights
    from medmodal.networks.registry import create_network

    net = create_network("multimix_unet_tiny", **KW)
    module = SimpleNamespace(network=net)
    cb = SelectedWeights(rule="validation", name="multimix_unet_tiny", kwargs=KW)
    set_weights(net, 1.0)
    cb.on_validation_end(fake_trainer(tmp_path, 0.8, 10), module)
    state = cb.state_dict()
    resumed = SelectedWeights(rule="validation", name="multimix_unet_tiny", kwargs=KW)
    resumed.load_state_dict(state)
    set_weights(net, 2.0)
    resumed.on_validation_end(fake_trainer(tmp_path, 0.7, 20), module)  # worse than the best before resuming
    assert selected_state(tmp_path) == ({"rule": "validation", "step": 10, "val_score": pytest.approx(0.8)}, 1.0)
    set_weights(net, 3.0)
    resumed.on_validation_end(fake_trainer(tmp_path, 0.85, 30), module)
    assert selected_state(tmp_path)[0]["step"] == 30
    # selected_network: the selected folder unless the rule is "last" (or nothing was selected)
    set_weights(net, 7.0)
    save_weights(net, tmp_path / "weights", name="multimix_unet_tiny", kwargs=KW)
    chosen, what = selected_network(tmp_path, "validation")
    assert value(next(chosen.parameters()).flatten()[0]) == 3.0 and "step 30" in what and "0.850" in what
    chosen, what = selected_network(tmp_path, "last")
    assert value(next(chosen.parameters()).flatten()[0]) == 7.0 and what == "the last step"
    empty = tmp_path / "bare"
    save_weights(net, empty / "weights", name="multimix_unet_tiny", kwargs=KW)
    chosen, what = selected_network(empty, "validation")
    assert value(next(chosen.parameters()).flatten()[0]) == 7.0 and what == "the last step"


# -- invariant 8: eval mode at inference ----------------------------------------------------------------------------
def test_eval_mode_after_saliency_train_keeps_dropout_on_restore_is_deterministic() -> None:
    g = torch.Generator().manual_seed(1)
    inputs = [ModelInput(image=torch.rand(1, *SIZE, generator=g) * 2 - 1, available=torch.tensor([True]),
                         mask=None, shape=(37, 29)) for _ in range(3)]
    inference = {"input_scaling": "unified", "channels_last": False}
    for restore in (True, False):
        net = tiny_net(dropout=0.25, restore=restore)
        net.train()
        a, b = (predict_inputs(net, inputs, inference=inference, batch_size=2) for _ in range(2))
        assert a[0].seg_prob.shape == (1, 37, 29) and a[0].saliency.shape == (37, 29)
        same = all(np.array_equal(x.seg_prob, y.seg_prob) and np.array_equal(x.class_prob, y.class_prob)
                   for x, y in zip(a, b, strict=True))
        assert same == restore, restore  # the released code's "eval" runs with dropout on (spec §2.5)
        assert all(np.isfinite(x.saliency).all() and x.saliency.min() >= 0 for x in a)
        assert all(abs(float(x.class_prob.sum()) - 1) < 1e-5 for x in a)
