"""ShaSpec network (Wang et al., CVPR 2023): the invariants of ``shared/methods/shaspec.md`` §3 (1–5, 10, 11,
12, 13-shapes), the encode-once / decode-many API, and the ``missing_fill`` and ``cls_head`` switches."""

from __future__ import annotations

import itertools

import pytest
import torch

from medmodal.networks.registry import create_network, list_networks
from medmodal.networks.shaspec import ShaSpecNet

MODS = ("t1", "t1c", "t2", "flair")
SHAPES = {2: (21, 23), 3: (16, 17, 19)}
CH = (4, 8)
# All 15 non-empty subsets of 4 modalities, in a fixed order.
SUBSETS = torch.tensor([list(m) for m in itertools.product([False, True], repeat=4) if any(m)])


def make(dims: int, seed: int = 0, **kw) -> ShaSpecNet:
    torch.manual_seed(seed)
    kw.setdefault("out_channels", 3)
    return ShaSpecNet(spatial_dims=dims, modalities=MODS, channels=CH, **kw).eval()


def image(dims: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, len(MODS), *SHAPES[dims], generator=torch.Generator().manual_seed(1))


def test_registered() -> None:
    assert {"shaspec", "shaspec_tiny"} <= set(list_networks())
    net = create_network("shaspec_tiny", spatial_dims=2, modalities=MODS, out_channels=3)
    assert isinstance(net, ShaSpecNet) and net.channels == CH


@pytest.mark.parametrize("dims", [2, 3])
def test_full_input_fill_switches_have_no_effect(dims: int) -> None:
    ref = make(dims, num_classes=2)
    x, available = image(dims), torch.ones(2, len(MODS), dtype=torch.bool)
    with torch.no_grad():
        a = ref.forward_features(x, available)
        for fill, skip, inp in [
            ("first", "mean", "skip"),
            ("first_in_order", "mean", "skip"),
            ("mean", "mean", "zero"),
            ("mean", "zero_input", "zero"),
            ("first", "zero_input", "zero"),
        ]:
            net = make(dims, num_classes=2, missing_fill=fill, skip_fill=skip, missing_input=inp)
            net.load_state_dict(ref.state_dict())
            b = net.forward_features(x, available)
            for name in ("logits", "class_logits", "fused", "domain_logits"):
                assert torch.equal(getattr(a, name), getattr(b, name)), (fill, skip, inp, name)


@pytest.mark.parametrize("dims", [2, 3])
def test_missing_slots_are_filled_from_shared_features(dims: int) -> None:
    available = torch.tensor([[True, False, True, True], [False, True, False, False], [True, False, False, True]])
    x = image(dims, batch=3)
    with torch.no_grad():
        out = make(dims).forward_features(x, available)
        first = make(dims, missing_fill="first").forward_features(x, available)
    r = out.shared
    # one missing: the mean of the available r_j (paper Eq. 4)
    torch.testing.assert_close(out.fused[0, 1], r[0, [0, 2, 3]].mean(0), atol=1e-6, rtol=0)
    # single available modality: every missing slot is r_j
    for m in (0, 2, 3):
        assert torch.equal(out.fused[1, m], r[1, 1])
    # two missing: identical slots
    assert torch.equal(out.fused[2, 1], out.fused[2, 2])
    torch.testing.assert_close(out.fused[2, 1], (r[2, 0] + r[2, 3]) / 2, atol=1e-6, rtol=0)
    # `first` without a drawn source (evaluation): the first available modality in modality order
    assert torch.equal(first.fused[0, 1], r[0, 0])
    assert torch.equal(first.fused[2, 2], r[2, 0])
    # present slots do not depend on the fill
    assert torch.equal(first.fused[0, 3], out.fused[0, 3])


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("mode", ["skip", "zero"])
def test_garbage_in_missing_channels_changes_nothing(dims: int, mode: str) -> None:
    kw = {"missing_input": "zero", "skip_fill": "zero_input"} if mode == "zero" else {}
    net = make(dims, num_classes=2, **kw)
    available = torch.tensor([[True, False, True, False], [False, False, False, True]])
    clean = torch.where(available[(...,) + (None,) * dims], image(dims), torch.zeros(()))
    garbage = clean.clone()
    garbage[:, 1] = 1e6 * torch.randn_like(garbage[:, 1])
    garbage[0, 3] = float("nan")
    garbage[1, 0] = float("inf")
    with torch.no_grad():
        a, b = net.forward_features(clean, available), net.forward_features(garbage, available)
    for name in ("logits", "class_logits", "fused"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for name in ("shared", "specific", "domain_logits"):
        assert torch.equal(getattr(a, name)[available], getattr(b, name)[available]), name


@pytest.mark.parametrize("dims", [2, 3])
def test_zero_fusion_weight_gives_residual_identity(dims: int) -> None:
    net = make(dims)
    with torch.no_grad():
        net.fusion.weight.zero_()
        available = torch.tensor([[True, True, False, True], [False, True, False, False]])
        out = net.forward_features(image(dims), available)
    assert torch.equal(out.fused[available], out.shared[available])


@pytest.mark.parametrize("dims", [2, 3])
def test_decoder_width_and_output_size_for_every_subset(dims: int) -> None:
    net = make(dims)
    widths: list[int] = []
    net.decoder.ups[0].register_forward_pre_hook(lambda _m, args: widths.append(args[0].shape[1]))
    x = image(dims, batch=1)
    with torch.no_grad():
        for mask in SUBSETS:
            assert net(x, mask[None]).shape == (1, 3, *SHAPES[dims])
        # the evaluator's one-pass shape: B·K rows, sample-major
        out = net.decode_subsets(net.encode(image(dims), torch.ones(2, 4, dtype=torch.bool)), SUBSETS)
    assert widths == [len(MODS) * CH[-1]] * (len(SUBSETS) + 1)
    assert out.logits.shape == (2 * len(SUBSETS), 3, *SHAPES[dims])
    assert torch.equal(out.available, SUBSETS.repeat(2, 1))


@pytest.mark.parametrize("dims", [2, 3])
def test_every_parameter_gets_a_gradient_from_the_training_outputs(dims: int) -> None:
    net = make(dims, num_classes=2).train()
    out = net.forward_features(image(dims), torch.ones(2, len(MODS), dtype=torch.bool))
    loss = out.logits.square().mean() + out.class_logits.square().mean() + out.domain_logits.square().mean()
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing, missing
    assert net.auxiliary_parameter_prefixes == ("domain_head.", "cls_head.")


def test_specific_encoder_of_a_missing_modality_is_never_called() -> None:
    net = make(3)
    calls: dict[str, list[int]] = {m: [] for m in MODS}
    for m in MODS:
        net.specific_encoders[m].register_forward_hook(lambda _m, args, _o, m=m: calls[m].append(args[0].shape[0]))
    available = torch.tensor([[True, False, True, False], [False, False, True, True], [True, False, True, False]])
    with torch.no_grad():
        net(image(3, batch=3), available)
    assert calls == {"t1": [2], "t1c": [], "t2": [3], "flair": [1]}


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("mode", ["paper", "code"])
def test_decode_subsets_equals_encoding_each_subset(dims: int, mode: str) -> None:
    kw = {"missing_input": "zero", "skip_fill": "zero_input", "missing_fill": "first"} if mode == "code" else {}
    net = make(dims, num_classes=2, **kw)
    x = image(dims)
    masks = SUBSETS[[0, 3, 6, 14]]  # flair; t2+flair; t1c+t2; all
    with torch.no_grad():
        many = net.decode_subsets(net.encode(x, torch.ones(2, 4, dtype=torch.bool)), masks)
        for b, k in itertools.product(range(2), range(len(masks))):
            one = net.forward_features(x[b : b + 1], masks[k][None])
            i = b * len(masks) + k
            torch.testing.assert_close(many.logits[i], one.logits[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(many.class_logits[i], one.class_logits[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(many.fused[i], one.fused[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["skip", "zero"])
def test_shared_encoder_runs_once_per_forward(mode: str) -> None:
    kw = {"missing_input": "zero", "skip_fill": "zero_input"} if mode == "zero" else {}
    net = make(2, **kw)
    sizes: list[int] = []
    net.shared_encoder.register_forward_hook(lambda _m, args, _o: sizes.append(args[0].shape[0]))
    available = torch.tensor([[True, False, True, False], [False, False, False, True]])
    with torch.no_grad():
        net(image(2), available)
    # skip: the 3 available pairs; zero: all 2·4 pairs plus the one zero image of the zero-input skips
    assert sizes == ([3] if mode == "skip" else [9])


def test_channels_last_and_classification_only() -> None:
    net = make(3, out_channels=0, num_classes=5)
    assert net.decoder is None and net.auxiliary_parameter_prefixes == ("domain_head.",)
    x, available = image(3), torch.tensor([[True, False, True, True], [False, True, False, False]])
    with torch.no_grad():
        a = net(x, available)
        b = net(x.contiguous(memory_format=torch.channels_last_3d), available)
    assert a.shape == (2, 5)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_bad_inputs_are_clear_errors() -> None:
    net = make(2)
    x = image(2)
    with pytest.raises(ValueError, match=r"sample\(s\) \[1\] have none"):
        net(x, torch.tensor([[True, False, False, False], [False] * 4]))
    with pytest.raises(ValueError, match=r"expected image \(B, 4"):
        net(x[:, :3], torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="available must be"):
        net(x, torch.ones(2, 3, dtype=torch.bool))
    feats = net.encode(x, torch.tensor([[True, False, True, False], [True, True, True, True]]))
    with pytest.raises(ValueError, match=r"subset of features.encoded.*\[0\]"):
        net.decode(feats, torch.tensor([[True, True, False, False], [True, False, False, False]]))
    with pytest.raises(ValueError, match=r"sample\(s\) \[0\]"):
        net.decode(feats, torch.tensor([[False] * 4, [True, False, False, False]]))
    with pytest.raises(ValueError, match=r"mask\(s\) \[1\]"):
        net.decode_subsets(feats, torch.tensor([[True, False, False, False], [False] * 4]))
    with pytest.raises(ValueError, match="subset of features.encoded"):
        net.decode_subsets(feats, SUBSETS)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"skip_fill": "zero_input"}, "requires missing_input='zero'"),
        ({"out_channels": 0}, "num_classes > 0"),
        ({"modalities": ()}, "at least one modality"),
        ({"modalities": ("t1", "t1")}, "unique"),
        ({"missing_fill": "median"}, "missing_fill"),
        ({"num_classes": 2, "cls_head": "gelu"}, "cls_head must be"),
        ({"spatial_dims": 4}, "spatial_dims"),
    ],
)
def test_bad_configurations_are_clear_errors(kw: dict, match: str) -> None:
    args = {"spatial_dims": 3, "modalities": MODS, "out_channels": 3, "channels": CH} | kw
    with pytest.raises(ValueError, match=match):
        ShaSpecNet(**args)


def test_avgmax_pool_head_and_bad_pool() -> None:
    net = make(2, out_channels=0, num_classes=3, cls_pool="avgmax")
    assert net.cls_head[0].in_features == len(MODS) * CH[-1] * 2
    with torch.no_grad():
        assert net(image(2), torch.ones(2, len(MODS), dtype=torch.bool)).shape == (2, 3)
    with pytest.raises(ValueError, match="cls_pool must be"):
        make(2, out_channels=0, num_classes=3, cls_pool="max")



@pytest.mark.parametrize("dims", [2, 3])
def test_first_fill_copies_the_drawn_source_modality(dims: int) -> None:
    # The released code fills missing slots from the first modality of a *shuffled* subset: a random available
    # one, drawn by the training system and passed as fill_source.
    available = torch.tensor([[True, False, True, True], [False, True, False, True]])
    x = image(dims)
    net = make(dims, missing_fill="first")
    in_order = make(dims, missing_fill="first_in_order")
    with torch.no_grad():
        a = net.forward_features(x, available, fill_source=torch.tensor([3, 1]))
        b = net.forward_features(x, available, fill_source=torch.tensor([2, 3]))
        default = net.forward_features(x, available)
        ordered = in_order.forward_features(x, available)
    r = a.shared
    assert torch.equal(a.fused[0, 1], r[0, 3]) and torch.equal(b.fused[0, 1], r[0, 2])
    assert all(torch.equal(a.fused[1, m], r[1, 1]) and torch.equal(b.fused[1, m], r[1, 3]) for m in (0, 2))
    assert not torch.equal(a.logits, b.logits)  # the source reaches the output
    assert torch.equal(a.fused[available], b.fused[available])  # present slots do not depend on it
    # no source: the first available in modality order, which is what `first_in_order` always does
    assert torch.equal(default.fused[0, 1], r[0, 0]) and torch.equal(default.fused[1, 0], r[1, 1])
    assert torch.equal(default.logits, ordered.logits)


def test_fill_source_errors() -> None:
    available = torch.tensor([[True, False, True, True], [False, True, False, True]])
    x = image(2)
    with pytest.raises(ValueError, match=r"available modality; not so for sample\(s\) \[1\]"):
        make(2, missing_fill="first").forward_features(x, available, fill_source=torch.tensor([0, 0]))
    with pytest.raises(ValueError, match=r"available modality; not so for sample\(s\) \[0\]"):
        make(2, missing_fill="first").forward_features(x, available, fill_source=torch.tensor([7, 1]))
    with pytest.raises(ValueError, match=r"\(2,\) integer tensor"):
        make(2, missing_fill="first").forward_features(x, available, fill_source=torch.tensor([0.0, 1.0]))
    for fill in ("mean", "first_in_order"):
        with pytest.raises(ValueError, match="missing_fill='first' only"):
            make(2, missing_fill=fill).forward_features(x, available, fill_source=torch.tensor([0, 1]))


@pytest.mark.parametrize("dims", [2, 3])
def test_paper_classification_head_has_no_relu(dims: int) -> None:
    # Spec §2.2: GAP per slot, concat, FC, dropout, FC. The `relu` head adds a ReLU after the first FC.
    paper = make(dims, num_classes=3, cls_hidden=16)
    relu = make(dims, num_classes=3, cls_hidden=16, cls_head="relu")
    assert [type(m).__name__ for m in paper.cls_head] == ["Linear", "Dropout", "Linear"]
    assert [type(m).__name__ for m in relu.cls_head] == ["Linear", "ReLU", "Dropout", "Linear"]
    with pytest.raises(RuntimeError, match="cls_head"):  # a relu checkpoint does not load silently
        paper.load_state_dict(relu.state_dict())
    state = relu.state_dict()
    state["cls_head.2.weight"], state["cls_head.2.bias"] = state.pop("cls_head.3.weight"), state.pop("cls_head.3.bias")
    paper.load_state_dict(state)
    x, available = image(dims), torch.tensor([[True, False, True, True], [False, True, False, False]])
    with torch.no_grad():
        a, b = paper.forward_features(x, available), relu.forward_features(x, available)
        assert torch.equal(a.fused, b.fused)
        pooled = a.fused.flatten(3).mean(3).reshape(2, -1)
        first, last = paper.cls_head[0], paper.cls_head[2]
        torch.testing.assert_close(a.class_logits, last(first(pooled)))  # affine at evaluation
        torch.testing.assert_close(b.class_logits, last(torch.relu(first(pooled))))
    assert not torch.allclose(a.class_logits, b.class_logits)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("norm", ["instance", "batch"])
@pytest.mark.parametrize("mode", ["paper", "code"])
def test_batch_of_one_trains_at_a_one_voxel_bottleneck(dims: int, norm: str, mode: str) -> None:
    # Spec invariant 12 (billhhh/ShaSpec#1): four stages on an 8^d input would leave a 1-voxel bottleneck, where
    # instance norm (and batch norm at batch 1) cannot normalise; the network pads it to 2 voxels per axis.
    kw = {"missing_input": "zero", "skip_fill": "zero_input", "missing_fill": "first"} if mode == "code" else {}
    torch.manual_seed(0)
    net = ShaSpecNet(spatial_dims=dims, modalities=MODS, out_channels=3, channels=(4, 8, 8, 8), norm=norm,
                     num_classes=2, **kw).train()
    x = torch.randn(1, len(MODS), *([8] * dims))
    out = net.forward_features(x, torch.tensor([[True, False, True, True]]))
    assert out.logits.shape == (1, 3, *([8] * dims)) and out.class_logits.shape == (1, 2)
    assert out.shared.shape == (1, len(MODS), 8, *([2] * dims))
    (out.logits.mean() + out.class_logits.mean() + out.domain_logits.mean()).backward()
    assert torch.isfinite(net.shared_encoder.stages[0].conv1.conv.weight.grad).all()
    if dims == 2:  # only the degenerate case is padded further: 8 x 16 keeps its 1 x 2 bottleneck
        wide = net.forward_features(torch.randn(1, len(MODS), 8, 16), torch.ones(1, 4, dtype=torch.bool))
        assert wide.shared.shape[-2:] == (1, 2)
