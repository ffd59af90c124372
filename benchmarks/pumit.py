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

**3. ViT training step vs MONAI** (:class:`monai.networks.nets.ViT`, needs ``einops``), its own round-robin after
the others: ``encode`` of all tokens, the mean square of the output tokens as the loss, ``backward``, AdamW (the
default, per-tensor loop on CPU, as ``medmodal train`` uses it). Both models have the same width, layers, heads and
token grid (MONAI's patch is PUMIT's effective one, ``16 x 16 x (16 >> DA)`` in 3D, ``16 x 16`` in 2D) and the
same parameter count up to the extras below. Cases: the CPU size at ``--batch`` on the 64-token inputs (3D 64³
DA 0, 2D 128²), then batch 8 at width 192 (6 layers, 3 heads) and width 384 (6 layers, 6 heads) on the 64-token
inputs and on 256-token ones (3D 128² x 16 at DA 2, i.e. 8 x 8 x 4 tokens; 2D 256²), ``--monai-repeats`` rounds.
What PUMIT computes on top (spec §2.4), printed with the table: a cls token (``1 + L`` tokens against MONAI's
``L``), 3D RoPE on q and k, a LayerNorm on the SwiGLU hidden features (sub-LN), a learned 10 x 10 x 5 position
grid resampled to the token grid, a 16³ SAC patch kernel whose depth taps are summed when DA > 0 (16x MONAI's
2D kernel in 2D: its gradient and AdamW update are 16x larger) and more parameter tensors for AdamW's loop (separate
q/v biases, the sub-LN's); attention is SDPA (MONAI's default is its einsum-softmax path); the MLP is SwiGLU 8/3
against GELU 4x (the same parameter count). Issue 14's target: not slower; the verdict allows 5 % for the noise of
a shared machine (ratio <= 1.05). The CPU-time column (process time, both threads) is less disturbed by other
processes than the wall clock.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` over one call (convolutions and matrix products,
a multiply-add = 2 FLOPs; attention counted through SDPA's math path, which the CPU kernel has no formula for).
The reference is one large ``Conv3d`` (32 -> 32, 3³, 1 x 32 x 64³, inference) of ``benchmarks/evaluation.py``,
timed in the same run. Everything runs round-robin, one call of each per round, so load from other processes hits
all alike; the tables give medians, and ratios also as the median of the per-round ratios ("paired"); a verdict is
PASS or FAIL only when both agree (UNDECIDED otherwise).

``--spec-size`` adds the spec's sizes (tokenizer widths (128, 256, 512), ViT-B: width 768, 12 layers, 12 heads;
3 input channels) for the 3D DA-0 and 2D inputs, with ``--spec-repeats`` rounds. The default run takes about 5
minutes on a loaded 2-core machine (``--monai-only``: only section 3, about 2 minutes); ``--quick`` is a smoke run of
about 20 s.

Example (the figures in docs/benchmarks.md)::

    OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE python benchmarks/pumit.py --threads 2
    OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE python benchmarks/pumit.py --threads 2 --monai-only
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import shlex
import statistics
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


@dataclass(frozen=True)
class Versus:
    """One PUMIT-vs-MONAI case: a model size, a batch and an input ``(X, Y, Z)`` at ``da`` (2D: ``(X, Y)``, DA 5)."""

    size: Size
    batch: int
    spatial: tuple[int, ...]
    da: int

    @property
    def monai_patch(self) -> tuple[int, ...]:
        """MONAI's patch: PUMIT's effective one, ``16 x 16 x (16 >> DA)`` (2D: ``16 x 16``)."""
        return (16, 16) if len(self.spatial) == 2 else (16, 16, max(16 >> self.da, 1))

    @property
    def tokens(self) -> int:
        """Grid tokens ``L`` (MONAI's sequence; PUMIT adds the cls token)."""
        return math.prod(s // p for s, p in zip(self.spatial, self.monai_patch, strict=True))

    @property
    def label(self) -> str:
        shape = "x".join(map(str, self.spatial))
        dims = f"2D {shape}" if len(self.spatial) == 2 else f"3D {shape} DA {self.da}"
        return f"W{self.size.width} B{self.batch} {dims}, 1+{self.tokens} tok"


def versus_cases(batch: int, *, quick: bool = False) -> list[Versus]:
    """The CPU size at ``batch`` on the 64-token inputs, then batch 8 at widths 192 and 384 on 64 and 256 tokens."""
    small = [((64, 64, 64), 0), ((128, 128), MAX_DA)]
    cases = [Versus(CPU, batch, shape, da) for shape, da in small]
    if quick:
        return cases
    wide = Size("width 384", CPU.tok_widths, 384, 6, 6)
    large = [((128, 128, 16), 2), ((256, 256), MAX_DA)]
    return cases + [Versus(size, 8, shape, da) for size in (CPU, wide) for shape, da in small + large]


def vit_steps(
    case: Versus, vit_class: type
) -> tuple[Callable[[], None], Callable[[], None], PUMITViT, torch.nn.Module]:
    """A training step of the PUMIT ViT and of MONAI's ``vit_class`` of the same size on the same input: encode all
    tokens, loss = the mean square of the output tokens, backward, AdamW; and the two models."""
    size = case.size
    torch.manual_seed(0)
    pumit = PUMITViT(in_channels=size.channels, patch_size=16, width=size.width, num_layers=size.layers,
                     num_heads=size.heads).train()
    x = torch.randn(case.batch, size.channels, *case.spatial)
    monai = vit_class(in_channels=size.channels, img_size=case.spatial, patch_size=case.monai_patch,
                      hidden_size=size.width, mlp_dim=4 * size.width, num_layers=size.layers, num_heads=size.heads,
                      qkv_bias=True, spatial_dims=len(case.spatial)).train()
    return (adamw_step(list(pumit.parameters()), lambda: pumit.encode(x, case.da).tokens.square().mean()),
            adamw_step(list(monai.parameters()), lambda: monai(x)[0].square().mean()), pumit, monai)


def monai_rows(cases: list[Versus]) -> list[tuple[Versus, Timed, Timed, str]]:
    """``(case, PUMIT step, MONAI step, parameter counts)`` per case; [] without einops."""
    try:
        import einops  # noqa: F401
        from monai.networks.nets import ViT
    except ImportError as err:
        print(f"MONAI ViT comparison skipped: {err} (install einops: pip install 'einops>=0.7', in the dev extra)")
        return []
    out = []
    for case in cases:
        pumit_step, monai_step, pumit, monai = vit_steps(case, ViT)
        rows = [Timed(f"{who} ViT step, {case.label}", fn, flops=counted(fn))
                for who, fn in (("PUMIT", pumit_step), ("MONAI", monai_step))]
        # tensors AdamW updates (MONAI builds an unused cross-attention norm per block: no gradient, skipped)
        counts = [(sum(p.numel() for p in m.parameters() if p.grad is not None) / 1e6,
                   sum(1 for p in m.parameters() if p.grad is not None)) for m in (pumit, monai)]
        out.append((case, *rows, " / ".join(f"{n:.2f} M in {t}" for n, t in counts)))
    return out


VERSUS_DIFFERENCES = (
    "What PUMIT computes on top (spec §2.4): a cls token (1 + L tokens, MONAI L); 3D RoPE on q and k; a LayerNorm on "
    "the SwiGLU hidden features (sub-LN); a learned 10x10x5 position grid resampled to the token grid (MONAI: a table "
    "of the grid's size); a 16³ SAC patch kernel, its depth taps summed when DA > 0 (MONAI: the effective kernel "
    "16x16x(16>>DA), 16x16 in 2D: PUMIT's 2D kernel gradient and AdamW update are 16x larger); separate q/v biases "
    "and the sub-LN's parameters (more tensors in AdamW's per-tensor loop). Attention: SDPA (MONAI: its default "
    "einsum-softmax). MLP: SwiGLU 8/3 vs GELU 4x, the same parameter count."
)


def measure_versus(cases: list[Versus], *, rounds: int, warmup: int) -> None:
    """Section 3: the PUMIT and MONAI ViT steps of every case round-robin, with the reference convolution."""
    t0 = time.perf_counter()
    ref_flops, ref_fn = conv_reference()
    ref = Timed("reference Conv3d 32->32 3³, 64³", ref_fn, flops=ref_flops)
    versus = monai_rows(cases)
    if not versus:
        return
    print(f"\n## ViT training step vs MONAI ViT ({len(cases)} cases, built in {time.perf_counter() - t0:.0f} s)",
          flush=True)
    run_rounds([ref] + [r for _, a, b, _ in versus for r in (a, b)], rounds=rounds, warmup=warmup)
    print(f"target: not slower, ratio <= {MONAI_TARGET}; reference {ref.name}: {ref.median * 1e3:.1f} ms, "
          f"{ref.gflops():.1f} GFLOP/s\n{VERSUS_DIFFERENCES}")
    print(f"{'':<38}{'PUMIT ms':>9}{'MONAI ms':>9}{'PUMIT GF/s':>11}{'/ref':>5}{'MONAI GF/s':>11}{'/ref':>5}"
          f"{'CPU-time':>9}  PUMIT / MONAI (wall)            parameters (PUMIT / MONAI, in tensors)")
    for case, a, b, params in versus:
        cpu = statistics.median(a.cpu) / statistics.median(b.cpu)
        print(f"{case.label:<38}{a.median * 1e3:>9.1f}{b.median * 1e3:>9.1f}{a.gflops():>11.1f}"
              f"{a.gflops() / ref.gflops():>5.0%}{b.gflops():>11.1f}{b.gflops() / ref.gflops():>5.0%}{cpu:>9.2f}  "
              f"{verdict(a, b, MONAI_TARGET):<32}{params}")
    print(f"(median of {rounds} rounds after {warmup} warm-up, all calls round-robin; ms: wall clock per step; GF/s: "
          "counted FLOPs / median wall time, /ref: relative to the reference; CPU-time: the ratio of median process "
          "times; paired: the median of per-round ratios)")


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
    rows = [ref] + [r for *_, r, _ in through] + [r for _, _, *rs in layers for r in rs]
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

    print(f"(median of {rounds} rounds after {warmup} warm-up, all calls round-robin; ms/call: wall clock; /ref: "
          "GFLOP/s relative to the reference; paired: the median of per-round ratios)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=40, help="rounds of the CPU size")
    p.add_argument("--warmup", type=int, default=2, help="rounds not kept")
    p.add_argument("--batch", type=int, default=2, help="inputs per call")
    p.add_argument("--monai-repeats", type=int, default=10, help="rounds of the ViT vs MONAI comparison")
    p.add_argument("--monai-only", action="store_true", help="only the ViT vs MONAI comparison (section 3)")
    p.add_argument("--spec-size", action="store_true", help="also the spec's sizes (ViT-B), 3D DA 0 and 2D only")
    p.add_argument("--spec-repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="a smoke run: 2 rounds, 1 warm-up, batch 1, no spec size")
    args = p.parse_args()
    if args.quick:
        args.repeats, args.monai_repeats, args.warmup, args.batch, args.spec_size = 2, 2, 1, 1, False
    if min(args.repeats, args.batch, args.spec_repeats, args.monai_repeats, args.threads) < 1 or args.warmup < 0:
        p.error("--repeats, --batch, --monai-repeats, --spec-repeats and --threads must be >= 1, --warmup >= 0")
    torch.set_num_threads(args.threads)
    print(f"# PUMIT throughput, {datetime.datetime.now():%Y-%m-%dT%H:%M}, CPU, {args.threads} threads "
          f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}), torch {torch.__version__}; load average "
          f"{os.getloadavg()[0]:.1f} at the start")
    print(f"command: {shlex.join(['python', *sys.argv])}")
    t0 = time.perf_counter()
    if not args.monai_only:
        measure(CPU, das=INPUT_DAS, batch=args.batch, rounds=args.repeats, warmup=args.warmup, sac=True)
    measure_versus(versus_cases(args.batch, quick=args.quick), rounds=args.monai_repeats, warmup=args.warmup)
    if args.spec_size:
        if not args.monai_only:
            measure(SPEC, das=(MAX_DA, 0), batch=args.batch, rounds=args.spec_repeats, warmup=1, sac=False)
        measure_versus([Versus(SPEC, args.batch, (64, 64, 64), 0), Versus(SPEC, args.batch, (128, 128), MAX_DA)],
                       rounds=args.spec_repeats, warmup=1)
    print(f"\n{time.perf_counter() - t0:.0f} s in all; load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
