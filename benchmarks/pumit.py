"""PUMIT throughput: tokens per second of the tokenizer and the ViT on 2D and 3D inputs of several spacings, SAC
layers against the plain convolution of the same output size, and a ViT training step against MONAI's ``ViT``
(issue 14, spec ``shared/methods/pumit.md``).

Inputs (batch ``--batch``, one grey channel; the slice axis last): a 2D image is the one-slice volume
``(B, 1, 128, 128, 1)`` at DA 5; a 3D crop is ``(B, 1, 64, 64, 64 >> DA)`` at DA 0, 2 and 3 (an isotropic 64³ crop
and the same field of view with 4x and 8x thicker slices). With a stride-16 tokenizer and patch-16 ViT every input
is 64 tokens: ``8 x 8 x 1`` in 2D, ``4 x 4 x 4`` in 3D (depth patch ``16 >> DA`` voxels).

**1. Tokens per second** (grid tokens, the ViT's cls token not counted):

* tokenizer (:class:`~medmodal.networks.pumit_tokenizer.PUMITTokenizer`, widths (32, 64, 128), stem 4 (stride 16),
  1024 codes, soft quantiser), eval mode, no gradient: ``encode`` + ``quantize`` (what MIM targets cost) and the
  full ``forward`` (encode, quantize, decode);
* ViT (:class:`~medmodal.networks.pumit_vit.PUMITViT`, width 192, 6 layers, 3 heads, patch 16, 1024 codes): ``encode``
  of all tokens (eval, no gradient) and one MIM training step: :func:`~medmodal.losses.pumit.random_visible` (mask
  ratio 0.55), ``forward_mim`` with mask tokens in every layer (BEiT-style, the spec's ViT-B), the soft-target
  cross-entropy against pre-computed tokenizer targets, ``backward``, AdamW. A whole MIM step also pays the
  tokenizer's ``encode`` + ``quantize`` of the same input (the first rows).

**2. SAC layers** (:class:`~medmodal.layers.sac.SACConv`, forward + backward, the weight gradient flowing through
the depth-tap sums) against ``F.conv3d`` with the layer's full ``k³`` kernel producing the same output size, i.e.
the plain convolution of the volume made isotropic (its slices repeated ``2^DA`` times, spec §2.2; the input
gets a gradient except for the patch embedding, as in training): the tokenizer's
downsampling ``k = s = 2`` (32 -> 64 channels, 64² in-plane), the ViT's patch embedding ``k = s = 16`` (1 -> 192,
128² in-plane) and a ``3³`` conv (64 -> 64, 32² in-plane), at DA 0 (SAC is the plain conv: the wrapper's overhead),
DA 2 and 2D (DA 5). A third column runs ``F.conv3d`` with the kernel summed once beforehand: SAC minus it is the
cost of summing the depth taps at every call. Issue 14's target: SAC at most 1.2x the plain convolution's time.

**3. ViT training step vs MONAI** (:class:`monai.networks.nets.ViT`, needs ``einops``): the same width, layers,
heads, patch and token count (MONAI's MLP 4x GELU, PUMIT's SwiGLU 8/3: the same parameter count; q/v vs qkv
biases; MONAI has no cls token, so it runs one token fewer), 3D (64³, DA 0) and 2D (128²; MONAI's 2D ViT, PUMIT's
one-slice volume): ``encode`` of all tokens, the mean square of the output tokens as the loss, ``backward``, AdamW.
Issue 14's target: not slower; the verdict allows 5 % for the noise of a shared machine (ratio <= 1.05).

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` over one call (convolutions and matrix products,
a multiply-add = 2 FLOPs; attention counted through SDPA's math path, which the CPU kernel has no formula for).
The reference is one large ``Conv3d`` (32 -> 32, 3³, 1 x 32 x 64³, inference) of ``benchmarks/evaluation.py``,
timed in the same run. Everything runs round-robin, one call of each per round, so load from other processes hits
all alike; the tables give medians, and ratios also as the median of the per-round ratios ("paired"); a verdict is
PASS or FAIL only when both agree (UNDECIDED otherwise).

``--spec-size`` adds the spec's sizes (tokenizer widths (128, 256, 512), ViT-B: width 768, 12 layers, 12 heads;
3 input channels) for the 3D DA-0 and 2D inputs, with ``--spec-repeats`` rounds. The default run takes about 3
minutes on a loaded 2-core machine; ``--quick`` is a smoke run of about 10 s.

Example (the figures in docs/benchmarks.md)::

    OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE python benchmarks/pumit.py --threads 2
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# this script's folder is on sys.path when it is run as ``python benchmarks/pumit.py``
from evaluation import conv_reference, flops_of
from medmodal.layers.sac import MAX_DA, SACConv, SACState
from medmodal.losses.pumit import masked_positions, random_visible, soft_target_cross_entropy
from medmodal.networks.pumit_tokenizer import PUMITTokenizer
from medmodal.networks.pumit_vit import PUMITViT
from multimix import Timed, paired, run_rounds

SAC_TARGET = 1.2  # issue 14: a SAC layer takes at most 1.2x the plain convolution of the same output size
MONAI_TARGET = 1.05  # issue 14: the ViT step is not slower than MONAI's (5 % allowed for noise)
INPUT_DAS = (MAX_DA, 0, 2, 3)  # 2D first
SAC_DAS = (0, 2, MAX_DA)


@dataclass(frozen=True)
class Size:
    """A model size: tokenizer widths, ViT width / layers / heads, input channels."""

    label: str
    tok_widths: tuple[int, ...]
    width: int
    layers: int
    heads: int
    channels: int = 1
    codes: int = 1024


CPU = Size("CPU size", (32, 64, 128), 192, 6, 3)
SPEC = Size("spec size", (128, 256, 512), 768, 12, 12, channels=3)


def input_shape(da: int, channels: int, batch: int) -> tuple[int, ...]:
    """``(B, C, 128, 128, 1)`` for 2D (DA 5), ``(B, C, 64, 64, 64 >> da)`` for 3D: 64 tokens of 16 x 16 x (16 >> DA)."""
    return (batch, channels, 128, 128, 1) if da == MAX_DA else (batch, channels, 64, 64, 64 >> da)


def input_label(da: int) -> str:
    return "2D 128², DA 5" if da == MAX_DA else f"3D 64²x{64 >> da}, DA {da}"


def counted(fn: Callable[[], object]) -> float:
    """FLOPs of one call of ``fn``, attention through SDPA's math path (counted as matrix products)."""
    with sdpa_kernel(SDPBackend.MATH):
        return flops_of(fn)


def no_grad(fn: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        with torch.inference_mode():
            return fn()

    return run


def adamw_step(params: list[torch.nn.Parameter], loss: Callable[[], torch.Tensor]) -> Callable[[], None]:
    """One call: ``loss()``, ``backward``, an AdamW step (lr 1e-4, weight decay 0.05) on ``params``."""
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05)

    def run() -> None:
        opt.zero_grad(set_to_none=True)
        loss().backward()
        opt.step()

    return run


def build(size: Size) -> tuple[PUMITTokenizer, PUMITViT]:
    torch.manual_seed(0)
    tok = PUMITTokenizer(in_channels=size.channels, widths=size.tok_widths, stem_stride=4, num_codes=size.codes).eval()
    vit = PUMITViT(in_channels=size.channels, patch_size=16, width=size.width, num_layers=size.layers,
                   num_heads=size.heads, codebook_size=size.codes)
    return tok, vit


def throughput_rows(size: Size, das: tuple[int, ...], batch: int) -> list[tuple[int, str, Timed, int]]:
    """``(da, op, row, tokens per call)`` for the tokenizer and ViT calls of every input."""
    tok, vit = build(size)
    out = []
    for da in das:
        x = torch.randn(input_shape(da, size.channels, batch))
        tokens = batch * math.prod(vit.token_grid(x.shape[2:], da))
        with torch.inference_mode():
            targets = tok.tokenize(x, da).softmax(1).flatten(2).transpose(1, 2).clone()  # (B, L, K)
        length = targets.shape[1]

        def mim_loss(x=x, da=da, targets=targets, length=length) -> torch.Tensor:
            visible = random_visible(length, batch_size=batch)
            logits = vit.forward_mim(x, da, visible, range(len(vit.blocks)))
            return soft_target_cross_entropy(logits, targets, masked_positions(visible, length))

        calls = {
            "tokenizer encode+quantize": no_grad(lambda x=x, da=da: tok.quantize(tok.encode(x, SACState(da))[0])),
            "tokenizer forward": no_grad(lambda x=x, da=da: tok(x, da)),
            "ViT encode": no_grad(lambda x=x, da=da: vit.encode(x, da)),
            "ViT MIM step": adamw_step(list(vit.parameters()), mim_loss),
        }
        for op, fn in calls.items():  # no dropout or batch norm: the ViT's train/eval modes compute the same
            out.append((da, op, Timed(f"{op}, {input_label(da)}", fn, flops=counted(fn)), tokens))
    return out


def sac_case(sac: SACConv, da: int, plane: int, depth: int) -> tuple[Callable[[], None], ...]:
    """Forward + backward of ``sac`` at ``da`` on ``(1, I, plane, plane, depth >> da)`` (depth 1 in 2D), of
    ``F.conv3d`` with the full ``k³`` kernel on the isotropic input of the same output size, and of ``F.conv3d``
    with the kernel's depth taps summed beforehand. Every call starts from fresh gradients (none accumulate); the
    input gets a gradient except for the patch embedding (an image needs none)."""
    state = SACState(da)
    cin, k, s, pad = sac.in_channels, sac.kernel_size, sac.stride, sac.padding
    grad_in = k != 16
    x = torch.randn(1, cin, plane, plane, 1 if da == MAX_DA else depth >> da, requires_grad=grad_in)
    weight, stride, padding = sac.adapted(state)
    with torch.no_grad():
        y_shape = F.conv3d(x, weight, sac.bias, stride=stride, padding=padding).shape
    # a deeper (isotropic) input gives the full-kernel conv the same output size
    x_iso = torch.randn(1, cin, plane, plane, y_shape[-1] * k if s == k else y_shape[-1], requires_grad=grad_in)
    assert sac.bias is not None
    plain = [t.detach().clone().requires_grad_() for t in (sac.weight, sac.bias)]
    summed = [t.detach().clone().requires_grad_() for t in (weight, sac.bias)]

    def fresh(*leaves: torch.Tensor) -> None:
        for t in leaves:
            t.grad = None

    def run_sac() -> None:
        fresh(x, *sac.parameters())
        sac(x, state)[0].sum().backward()

    def run_plain() -> None:
        fresh(x_iso, *plain)
        y = F.conv3d(x_iso, *plain, stride=s, padding=pad)
        assert y.shape == y_shape, (y.shape, y_shape)
        y.sum().backward()

    def run_summed() -> None:
        fresh(x, *summed)
        F.conv3d(x, *summed, stride=stride, padding=padding).sum().backward()

    return run_sac, run_plain, run_summed


def sac_rows(width: int) -> list[tuple[str, int, Timed, Timed, Timed]]:
    """``(layer, da, SAC, plain full-kernel conv, conv with a pre-summed kernel)``, each forward + backward."""
    layers = {  # name: (in, out, k, s, in-plane size, isotropic depth)
        "down k=s=2": (32, 64, 2, 2, 64, 64),
        "patch embed k=s=16": (1, width, 16, 16, 128, 128),
        "conv 3³": (64, 64, 3, 1, 32, 32),
    }
    out = []
    for name, (cin, cout, k, s, plane, depth) in layers.items():
        torch.manual_seed(0)
        sac = SACConv(in_channels=cin, out_channels=cout, kernel_size=k, stride=s)
        for da in SAC_DAS:
            fns = sac_case(sac, da, plane, depth)
            rows = [Timed(f"{tag} {name}, DA {da}", fn, flops=counted(fn))
                    for tag, fn in zip(("SAC", "plain", "summed"), fns, strict=True)]
            out.append((name, da, *rows))
    return out


def vit_steps(size: Size, da: int, batch: int, vit_class: type) -> tuple[Callable[[], None], Callable[[], None]]:
    """A training step of the PUMIT ViT and of MONAI's ``vit_class`` of the same size on the same input: encode all
    tokens, loss = the mean square of the output tokens, backward, AdamW."""
    torch.manual_seed(0)
    pumit = PUMITViT(in_channels=size.channels, patch_size=16, width=size.width, num_layers=size.layers,
                     num_heads=size.heads).train()
    shape = input_shape(da, size.channels, batch)
    x = torch.randn(shape)
    dims = 2 if da == MAX_DA else 3
    monai = vit_class(in_channels=size.channels, img_size=shape[2:2 + dims], patch_size=16, hidden_size=size.width,
                      mlp_dim=4 * size.width, num_layers=size.layers, num_heads=size.heads, qkv_bias=True,
                      spatial_dims=dims).train()
    x_monai = x[..., 0] if dims == 2 else x
    return (adamw_step(list(pumit.parameters()), lambda: pumit.encode(x, da).tokens.square().mean()),
            adamw_step(list(monai.parameters()), lambda: monai(x_monai)[0].square().mean()))


def monai_rows(size: Size, batch: int) -> list[tuple[str, Timed, Timed]]:
    """``(input, PUMIT step, MONAI step)`` for the 3D DA-0 and 2D inputs; [] without einops."""
    try:
        import einops  # noqa: F401
        from monai.networks.nets import ViT
    except ImportError as err:
        print(f"MONAI ViT comparison skipped: {err} (install einops: pip install 'einops>=0.7', in the dev extra)")
        return []
    out = []
    for da in (0, MAX_DA):
        rows = [Timed(f"{who} ViT step, {input_label(da)}", fn, flops=counted(fn))
                for who, fn in zip(("PUMIT", "MONAI"), vit_steps(size, da, batch, ViT), strict=True)]
        out.append((input_label(da), *rows))
    return out


def verdict(a: Timed, b: Timed, target: float) -> str:
    estimates = (a.median / b.median, paired(a, b))
    word = ("PASS" if max(estimates) <= target else "FAIL" if min(estimates) > target else "UNDECIDED")
    return f"{estimates[0]:.2f} (paired {estimates[1]:.2f}) -> {word}"


def gflops(r: Timed, ref: Timed) -> str:
    return f"{r.flops / 1e9:>8.2f}{r.gflops():>9.1f}{r.gflops() / ref.gflops():>6.0%}" if r.flops else f"{'':>23}"


def measure(size: Size, *, das: tuple[int, ...], batch: int, rounds: int, warmup: int, sac: bool) -> None:
    t0 = time.perf_counter()
    ref_flops, ref_fn = conv_reference()
    ref = Timed("reference Conv3d 32->32 3³, 64³", ref_fn, flops=ref_flops)
    through = throughput_rows(size, das, batch)
    layers = sac_rows(size.width) if sac else []
    versus = monai_rows(size, batch)
    rows = [ref] + [r for *_, r, _ in through] + [r for _, _, *rs in layers for r in rs] + \
        [r for _, *rs in versus for r in rs]
    tok, vit = build(size)  # only for the parameter counts
    tok_m, vit_m = (sum(p.numel() for p in m.parameters()) / 1e6 for m in (tok, vit))
    print(f"\n## {size.label}: tokenizer widths {size.tok_widths}, stride 16, {size.codes} codes "
          f"({tok_m:.1f} M parameters); ViT width {size.width}, "
          f"{size.layers} layers, {size.heads} heads, patch 16 ({vit_m:.1f} M);"
          f" {size.channels} channel(s), batch {batch}; {len(rows)} calls per round, built in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    run_rounds(rows, rounds=rounds, warmup=warmup)

    print(f"\n{'':<48}{'ms/call':>9}{'tokens/s':>10}{'GFLOP':>8}{'GFLOP/s':>9}{'/ref':>6}")
    print(f"{ref.name:<48}{ref.median * 1e3:>9.1f}{'':>10}{gflops(ref, ref)}")
    for _, _, r, tokens in through:
        print(f"{r.name:<48}{r.median * 1e3:>9.1f}{tokens / r.median:>10,.0f}{gflops(r, ref)}")
    ops = list(dict.fromkeys(op for _, op, _, _ in through))
    print(f"\ntokens per second ({batch} x 64 tokens per call):")
    print(f"{'input':<18}" + "".join(f"{op:>27}" for op in ops))
    for da in das:
        cells = {op: tokens / r.median for d, op, r, tokens in through if d == da}
        print(f"{input_label(da):<18}" + "".join(f"{cells[op]:>27,.0f}" for op in ops))

    if layers:
        print(f"\nSAC layers, forward + backward (target: SAC <= {SAC_TARGET}x the plain conv of the same output "
              "size, both as a ratio of medians and paired):")
        print(f"{'':<30}{'SAC ms':>8}{'plain ms':>9}{'summed ms':>10}{'SAC GFLOP/s':>12}{'plain GFLOP/s':>14}"
              f"{'sum cost ms':>12}  SAC / plain")
        words = []
        for name, da, s, p, m in layers:
            v = verdict(s, p, SAC_TARGET)
            words.append(v.split()[-1])
            print(f"{name + f', DA {da}':<30}{s.median * 1e3:>8.2f}{p.median * 1e3:>9.2f}{m.median * 1e3:>10.2f}"
                  f"{s.gflops():>12.1f}{p.gflops():>14.1f}{(s.median - m.median) * 1e3:>12.2f}  {v}")
        overall = "FAIL" if "FAIL" in words else "UNDECIDED" if "UNDECIDED" in words else "PASS"
        print(f"  -> {overall} (plain: F.conv3d with the full k³ kernel on the isotropic volume; summed: F.conv3d with "
              "the depth taps summed beforehand; sum cost: SAC - summed, the per-call kernel summation and wrapper)")

    if versus:
        print(f"\nViT training step vs MONAI ViT (same width/layers/heads/patch/tokens; target: not slower, "
              f"ratio <= {MONAI_TARGET}):")
        print(f"{'':<22}{'PUMIT ms':>9}{'MONAI ms':>9}{'PUMIT GFLOP/s':>14}{'MONAI GFLOP/s':>14}  PUMIT / MONAI")
        for label, a, b in versus:
            print(f"{label:<22}{a.median * 1e3:>9.1f}{b.median * 1e3:>9.1f}{a.gflops():>14.1f}{b.gflops():>14.1f}  "
                  f"{verdict(a, b, MONAI_TARGET)}")
    print(f"(median of {rounds} rounds after {warmup} warm-up, all calls round-robin; ms/call: wall clock; /ref: "
          "GFLOP/s relative to the reference; paired: the median of per-round ratios)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=40, help="rounds of the CPU size")
    p.add_argument("--warmup", type=int, default=2, help="rounds not kept")
    p.add_argument("--batch", type=int, default=2, help="inputs per call")
    p.add_argument("--spec-size", action="store_true", help="also the spec's sizes (ViT-B), 3D DA 0 and 2D only")
    p.add_argument("--spec-repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="a smoke run: 2 rounds, 1 warm-up, batch 1, no spec size")
    args = p.parse_args()
    if args.quick:
        args.repeats, args.warmup, args.batch, args.spec_size = 2, 1, 1, False
    if min(args.repeats, args.batch, args.spec_repeats, args.threads) < 1 or args.warmup < 0:
        p.error("--repeats, --batch, --spec-repeats and --threads must be >= 1, --warmup >= 0")
    torch.set_num_threads(args.threads)
    print(f"# PUMIT throughput, {datetime.datetime.now():%Y-%m-%dT%H:%M}, CPU, {args.threads} threads "
          f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}), torch {torch.__version__}; load average "
          f"{os.getloadavg()[0]:.1f} at the start")
    print(f"command: {shlex.join(['python', *sys.argv])}")
    t0 = time.perf_counter()
    measure(CPU, das=INPUT_DAS, batch=args.batch, rounds=args.repeats, warmup=args.warmup, sac=True)
    if args.spec_size:
        measure(SPEC, das=(MAX_DA, 0), batch=args.batch, rounds=args.spec_repeats, warmup=1, sac=False)
    print(f"\n{time.perf_counter() - t0:.0f} s in all; load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
