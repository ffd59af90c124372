"""MultiMix network (Haque et al., ISBI 2021): the invariants of ``shared/methods/multimix.md`` §3 (3, 4, 8, 9),
the saliency's mode/gradient hygiene and its ``restore_mode_after_saliency`` switch, the multitask API, 2D and 3D
with odd sizes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medmodal.networks.multimix import MultiMixNet, MultiMixOutput
from medmodal.networks.registry import create_network, list_networks

SHAPES = {2: (21, 23), 3: (17, 18, 19)}
MODS = ("xray", "other")
TINY = (4, 8, 16, 32)


def make(dims: int, seed: int = 0, modalities: tuple[str, ...] = MODS, **kw) -> MultiMixNet:
    torch.manual_seed(seed)
    kw.setdefault("channels", TINY)
    return MultiMixNet(spatial_dims=dims, modalities=modalities, out_channels=1, num_classes=2, **kw)


def batch(dims: int, num_mod: int = len(MODS), b: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(b, num_mod, *SHAPES[dims], generator=torch.Generator().manual_seed(1))
    return x, torch.ones(b, num_mod, dtype=torch.bool)


def reference_saliency(net: MultiMixNet, x: torch.Tensor) -> torch.Tensor:
    """The released code's recipe on a deep copy: eval mode, backward from the summed max logits, |x.grad|."""
    import copy

    ref = copy.deepcopy(net).eval()
    leaf = x.clone().requires_grad_(True)
    ref.classify(leaf, torch.ones(x.shape[:2], dtype=torch.bool)).max(dim=1).values.sum().backward()
    return leaf.grad.abs()


def test_registered_real_and_tiny() -> None:
    assert {"multimix_unet", "multimix_unet_tiny"} <= set(list_networks())
    tiny = create_network("multimix_unet_tiny", spatial_dims=3, modalities=("xray",), out_channels=1)
    assert isinstance(tiny, MultiMixNet) and tiny.channels == TINY and tiny.num_classes == 2
    full = create_network(
        "multimix_unet", spatial_dims=2, modalities=("xray",), out_channels=1, num_classes=2,
        channels=(16, 32, 64, 128, 256), dropout=0.25, classify=True, segment=True, saliency_bridge=True,
        restore_mode_after_saliency=True,
    )
    assert full.channels == (16, 32, 64, 128, 256) and full.auxiliary_parameter_prefixes == ("cls_head.",)


# ---------------------------------------------------------------- invariant 3: saliency
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("mode", ["train", "eval", "mixed"])
def test_saliency_values_mode_and_grads_untouched(dims: int, mode: str) -> None:
    net = make(dims)
    net.train(mode != "eval")
    if mode == "mixed":
        net.encoder[1].eval()
    flags = {name: m.training for name, m in net.named_modules()}
    x, available = batch(dims)
    # Half the parameters carry an earlier gradient, the others none: both must be left exactly as they were.
    params = list(net.parameters())
    for i, p in enumerate(params):
        p.grad = torch.randn_like(p) if i % 2 else None
    before = [None if p.grad is None else p.grad.clone() for p in params]

    s = net.saliency(x, available)

    assert s.shape == x.shape and not s.requires_grad
    assert torch.isfinite(s).all() and (s >= 0).all() and s.sum() > 0
    assert {name: m.training for name, m in net.named_modules()} == flags
    for p, g in zip(params, before, strict=True):
        assert (p.grad is None) if g is None else torch.equal(p.grad, g)
    # Dropout off during the pass: the released recipe in eval mode, and the same map in train mode.
    torch.testing.assert_close(s, reference_saliency(net, x))
    assert torch.equal(s, net.saliency(x, available))


@pytest.mark.parametrize("dims", [2, 3])
def test_saliency_of_a_constant_output_model_is_zero(dims: int) -> None:
    net = make(dims)
    with torch.no_grad():
        net.cls_head.weight.zero_()  # logits = bias, whatever the input
    s = net.saliency(*batch(dims))
    assert torch.equal(s, torch.zeros_like(s))


def test_saliency_of_a_missing_channel_is_zero_and_garbage_never_read() -> None:
    net = make(2).eval()
    x, _ = batch(2)
    available = torch.tensor([[True, False], [False, True]])
    clean = torch.where(available[..., None, None], x, torch.zeros(()))
    garbage = clean.clone()
    garbage[0, 1], garbage[1, 0] = float("nan"), float("inf")
    a, b = net.multitask(clean, available), net.multitask(garbage, available)
    for ta, tb in zip(a, b, strict=True):
        assert torch.equal(ta, tb)
    assert (a.saliency[0, 1] == 0).all() and (a.saliency[1, 0] == 0).all()
    assert a.saliency[0, 0].sum() > 0 and a.saliency[1, 1].sum() > 0


def test_saliency_under_no_grad_works_and_inference_mode_is_a_clear_error() -> None:
    net = make(2).eval()
    x, available = batch(2)
    expected = net.saliency(x, available)
    with torch.no_grad():
        assert torch.equal(net.saliency(x, available), expected)
        out = net.multitask(x, available)
    assert torch.equal(out.saliency, expected) and not out.seg_logits.requires_grad
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"inference_mode.*torch.no_grad"):
        net.saliency(x, available)
    with torch.inference_mode():
        x_inf = x.clone()  # an inference tensor used afterwards, outside inference mode, is fine
    assert torch.equal(net.saliency(x_inf, available), expected)


def test_faithful_switch_leaves_the_encoder_in_train_mode() -> None:
    x, available = batch(2)
    fixed, faithful = make(2, restore_mode_after_saliency=True), make(2, restore_mode_after_saliency=False)
    fixed.eval()
    faithful.eval()
    first = faithful.multitask(x, available)
    assert all(m.training for m in faithful.encoder.modules()) and faithful.cls_head.training
    assert not any(m.training for m in faithful.decoder.modules())  # the released code left the decoder alone
    assert not any(m.training for m in fixed.modules())
    # "Eval" now runs with the encoder's dropout on: two calls differ, unlike the fixed network's.
    second = faithful.multitask(x, available)
    assert not torch.equal(first.seg_logits, second.seg_logits)
    assert not torch.equal(first.class_logits, second.class_logits)
    a, b = fixed.multitask(x, available), fixed.multitask(x, available)
    assert torch.equal(a.seg_logits, b.seg_logits) and torch.equal(a.class_logits, b.class_logits)


# ---------------------------------------------------------------- invariant 4: the bridge
def capture_first_decoder_input(net: MultiMixNet) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}
    net.decoder[0].register_forward_hook(lambda mod, args, out: seen.__setitem__("in", args[0].detach()))
    net.encoder[-2].register_forward_hook(lambda mod, args, out: seen.__setitem__("skip", out.detach()))
    return seen


def test_bridge_is_386_channels_at_32_for_256_input_with_default_widths() -> None:
    torch.manual_seed(0)
    net = create_network("multimix_unet", spatial_dims=2, modalities=("xray",), out_channels=1).eval()
    assert net.decoder[0][0].in_channels == 256 + 128 + 2 == 386
    seen = capture_first_decoder_input(net)
    x = torch.rand(1, 1, 256, 256) * 2 - 1
    out = net.multitask(x, torch.ones(1, 1, dtype=torch.bool))
    assert seen["in"].shape == (1, 386, 32, 32)
    # The last two channels are concat[x, s] resized to 32² (bilinear, align_corners=True), the 128 before them
    # the enc4 skip.
    bridge = F.interpolate(torch.cat([x, out.saliency], 1), size=(32, 32), mode="bilinear", align_corners=True)
    torch.testing.assert_close(seen["in"][:, 384:], bridge)
    assert torch.equal(seen["in"][:, 256:384], seen["skip"])


@pytest.mark.parametrize("dims", [2, 3])
def test_bridge_lands_on_the_first_decoder_stage_for_odd_sizes(dims: int) -> None:
    net = make(dims).eval()
    seen = capture_first_decoder_input(net)
    x, available = batch(dims)
    out = net.multitask(x, available)
    skip_size = seen["skip"].shape[2:]
    assert skip_size == tuple(s // 4 for s in SHAPES[dims])  # level L-2 = 2 of 4
    assert seen["in"].shape == (2, 32 + 16 + 2 * len(MODS), *skip_size)
    mode = "trilinear" if dims == 3 else "bilinear"
    bridge = F.interpolate(torch.cat([x, out.saliency], 1), size=skip_size, mode=mode, align_corners=True)
    torch.testing.assert_close(seen["in"][:, 48:], bridge)
    assert out.seg_logits.shape == (2, 1, *SHAPES[dims]) and out.class_logits.shape == (2, 2)


@pytest.mark.parametrize("dims", [2, 3])
def test_without_bridge_the_first_decoder_stage_has_no_bridge_channels(dims: int) -> None:
    net = make(dims, saliency_bridge=False).eval()
    assert net.decoder[0][0].in_channels == 32 + 16 and net.bridge_channels == 0
    out = net.multitask(*batch(dims))
    assert out.saliency is None and out.seg_logits.shape == (2, 1, *SHAPES[dims])
    assert make(dims).decoder[0][0].in_channels == 32 + 16 + 2 * len(MODS)


def test_default_2d_parameter_count_matches_the_layer_table() -> None:
    net = create_network("multimix_unet", spatial_dims=2, modalities=("xray",), out_channels=1)

    def double_conv(c_in: int, c_out: int) -> int:  # two bias-free 3×3 convolutions
        return 9 * (c_in * c_out + c_out * c_out)

    enc = sum(double_conv(a, b) for a, b in [(1, 16), (16, 32), (32, 64), (64, 128), (128, 256)])
    dec = double_conv(386, 128) + double_conv(192, 64) + double_conv(96, 32) + double_conv(48, 16)
    expected = enc + dec + (256 * 2 + 2) + (16 + 1)
    count = sum(p.numel() for p in net.parameters())
    assert count == expected == 1_963_683  # the spec's "about 2 M"


# ---------------------------------------------------------------- invariant 8: mode safety
@pytest.mark.parametrize("dims", [2, 3])
def test_eval_is_deterministic_and_train_uses_dropout(dims: int) -> None:
    net = make(dims)
    x, available = batch(dims)
    net.eval()
    a, b = net.multitask(x, available), net.multitask(x, available)
    for ta, tb in zip(a, b, strict=True):
        assert torch.equal(ta, tb)
    assert torch.equal(net(x, available), a.seg_logits)
    net.train()
    c, d = net.multitask(x, available), net.multitask(x, available)
    assert not torch.equal(c.seg_logits, d.seg_logits) and not torch.equal(c.class_logits, d.class_logits)
    assert torch.equal(c.saliency, a.saliency)  # computed with dropout off, in either mode
    assert net.training and all(m.training for m in net.modules())


@pytest.mark.parametrize("dims", [2, 3])
def test_classify_equals_multitask_class_logits_in_eval(dims: int) -> None:
    net = make(dims).eval()
    x, available = batch(dims)
    logits = net.classify(x, available)
    assert logits.shape == (2, 2)
    assert torch.equal(logits, net.multitask(x, available).class_logits)


# ---------------------------------------------------------------- invariant 9: gradient coverage
@pytest.mark.parametrize("dims", [2, 3])
def test_one_multitask_step_gives_every_parameter_a_gradient(dims: int) -> None:
    net = make(dims).train()
    x, available = batch(dims)
    target = (x[:, :1] > 0).float()
    out = net.multitask(x, available)
    assert isinstance(out, MultiMixOutput) and not out.saliency.requires_grad
    p = torch.sigmoid(out.seg_logits)
    dice = 1 - ((2 * (p * target).sum((2, 3)) + 1) / (p.sum((2, 3)) + target.sum((2, 3)) + 1)).mean()
    loss = F.cross_entropy(out.class_logits, torch.tensor([0, 1])) + 5 * dice
    loss.backward()
    missing = [n for n, q in net.named_parameters() if q.grad is None or not q.grad.any()]
    assert not missing


@pytest.mark.parametrize("dims", [2, 3])
def test_segmentation_output_does_not_reach_the_classifier(dims: int) -> None:
    """The saliency is a constant for the decoder (no second-order terms), hence the auxiliary prefix."""
    net = make(dims).train()
    net(*batch(dims)).square().mean().backward()
    assert net.cls_head.weight.grad is None and net.cls_head.bias.grad is None
    assert all(q.grad is not None for n, q in net.named_parameters() if not n.startswith("cls_head."))


# ---------------------------------------------------------------- switches and errors
def test_single_task_networks() -> None:
    x, available = batch(2)
    seg_only = make(2, classify=False, saliency_bridge=False).eval()
    assert seg_only.cls_head is None and seg_only.auxiliary_parameter_prefixes == ()
    out = seg_only.multitask(x, available)
    assert out.class_logits is None and out.saliency is None and out.seg_logits.shape == (2, 1, 21, 23)
    with pytest.raises(ValueError, match="classify=True"):
        seg_only.classify(x, available)
    cls_only = make(2, segment=False, saliency_bridge=False).eval()
    assert cls_only.decoder is None and cls_only.seg_head is None
    out = cls_only.multitask(x, available)
    assert out.seg_logits is None and torch.equal(out.class_logits, cls_only.classify(x, available))
    with pytest.raises(ValueError, match=r"segment=False.*\.classify\(image, available\)"):
        cls_only(x, available)


def test_clear_errors() -> None:
    net = make(2)
    x, available = batch(2)
    with pytest.raises(ValueError, match=r"expected image \(B, 2, \*2D\), got \(2, 3, 21, 23\)"):
        net(torch.randn(2, 3, 21, 23), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"expected image \(B, 2, \*2D\)"):
        net(torch.randn(2, 2, 9, 21, 23), available)
    with pytest.raises(ValueError, match=r"available must be \(B, M\)"):
        net(x, torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"too small for 4 levels: every axis needs >= 16"):
        net(torch.randn(2, 2, 15, 23), available)
    with pytest.raises(ValueError, match="saliency_bridge=True needs classify=True and segment=True"):
        make(2, classify=False)
    with pytest.raises(ValueError, match="without an output"):
        make(2, classify=False, segment=False, saliency_bridge=False)
    with pytest.raises(ValueError, match="spatial_dims must be 2 or 3"):
        make(4)
    with pytest.raises(ValueError, match="dropout must be in"):
        make(2, dropout=1.0)
    with pytest.raises(ValueError, match="channels needs at least two"):
        make(2, channels=(4,))
    with pytest.raises(TypeError, match="multimix_unet_tiny.*channels"):
        create_network("multimix_unet_tiny", spatial_dims=2, modalities=MODS, out_channels=1, channels=(4, 8))


def test_saliency_impl_backward_is_the_released_extra_backward() -> None:
    """``saliency_impl="backward"`` (the released code) gives the same map as ``autograd.grad`` but wipes the
    parameter gradients (its ``zero_grad``), which the default leaves alone."""
    torch.manual_seed(0)
    kw = dict(spatial_dims=2, modalities=("xray",), out_channels=1)
    a = create_network("multimix_unet_tiny", **kw).eval()
    b = create_network("multimix_unet_tiny", **kw, saliency_impl="backward").eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 1, 21, 23)
    avail = torch.ones(2, 1, dtype=torch.bool)
    for net in (a, b):
        for p in net.parameters():
            p.grad = torch.ones_like(p)
    sa, sb = a.saliency(x, avail), b.saliency(x, avail)
    assert torch.allclose(sa, sb, atol=1e-6) and sa.abs().sum() > 0
    assert all(p.grad is not None and bool((p.grad == 1).all()) for p in a.parameters())
    assert all(p.grad is None for p in b.parameters())
    with pytest.raises(ValueError, match="saliency_impl"):
        create_network("multimix_unet_tiny", **kw, saliency_impl="grad")
