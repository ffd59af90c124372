"""MultiMix training-step cost: the saliency bridge's and semi-supervision's share of a step, data loading,
channels-last, and achieved GFLOP/s (issue 13, spec ``shared/methods/multimix.md``).

A step is exactly what ``medmodal train`` runs: :meth:`MultiMixSystem.losses` on one item of the real data
module (:class:`~medmodal.methods.multimix.data.MultiMixData` → ``StreamSteps``: five streams, the weak and strong
views of the unlabelled classification images) + ``backward`` + the recipe's optimiser step, fp32, on the CPU.
Every variant is built by the method plug-in from the same recipe (``method.variant``) and trains on the same
pre-loaded items (each uses the streams its variant trains; the others are ignored):

* ``multimix`` (UMTL-SSL-S): saliency bridge + FixMatch + KL;
* ``umtl_ssl``: semi-supervision only (FixMatch's weak and strong views, the unlabelled segmentation stream);
* ``umtl_s``: the saliency bridge only (the extra no-grad backward pass of the saliency, the bridge input);
* ``umtl``: the plain multi-task step (labelled segmentation + labelled classification).

Issue 13's target: the saliency bridge adds at most 50 % to a step, i.e. ``multimix / umtl_ssl <= 1.5`` and
``umtl_s / umtl <= 1.5``. ``multimix`` and ``umtl`` are also timed in the contiguous (NCHW) memory format (the
recipes train channels-last, ``train.channels_last``). Data loading is one ``StreamSteps`` item (what a
``num_workers: 0`` loader builds between two steps) of the ``multimix`` and the ``umtl`` data modules.

FLOPs are counted by ``torch.utils.flop_counter``'s formulas over one whole step (:class:`CountFlops`:
convolutions and matrix products, the saliency pass included, a multiply-add = 2 FLOPs; norms, activations,
losses, resizing and the optimiser are not counted). The reference is one large ``Conv2d`` (64→64, 3×3,
1×64×256², fp32, channels-last) forward + backward, timed in the same run. Everything runs round-robin, one
call of each per round (the reference and the loading a few calls in a row), so load from other processes hits
all alike; the tables give medians, and ratios also as the median of the per-round ratios ("paired", which
resists load spikes better; the PASS/FAIL verdicts use it).

Configurations: ``tiny`` (the ``multimix_tiny`` recipe: 64² chest X-ray phantom, widths 4..64, 5 streams × batch
8), and with ``--spec-size`` the spec's 256² network (widths 16..256, batch 10; a 256² phantom of
``--spec-cases`` images, generated once into ``$MEDMODAL_CACHE``), with ``--spec-repeats`` rounds. The default
run takes about a minute on a loaded 2-core machine; ``--spec-size`` adds about a minute per round.

Example (the figures in docs/benchmarks.md)::

    OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE python benchmarks/multimix.py --threads 2 --spec-size
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

VARIANTS = ("multimix", "umtl_ssl", "umtl_s", "umtl")
CONTIGUOUS = ("multimix", "umtl")  # also timed without channels-last
TARGET = 1.5  # issue 13: the saliency bridge adds at most 50 % to a step
REF_CALLS = 3  # reference calls in a row per round
LOAD_CALLS = 4  # loader items in a row per round
SPEC = {"data.phantom.size": 256, "data.patch_size": [256, 256], "method.image_size": [256, 256],
        "model.kwargs": {"channels": [16, 32, 64, 128, 256]}, "data.batch_size": 10}


@dataclass
class Timed:
    """One timed call: ``calls`` of ``fn`` per round; ``wall``/``cpu``: seconds per call, one entry per round."""

    name: str
    fn: Callable[[], object]
    calls: int = 1
    flops: float = 0.0
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.wall)

    def gflops(self) -> float:
        return self.flops / self.median / 1e9


class CountFlops(TorchDispatchMode):
    """FLOPs of the operators run inside, by ``torch.utils.flop_counter``'s formulas (convolutions and matrix
    products, forward and backward). ``FlopCounterMode`` itself cannot count a MultiMix step: the backward hooks
    of its module tracker make the saliency's ``torch.autograd.grad`` on a leaf input raise a RuntimeError
    (``_will_engine_execute_node``), so this mode counts without tracking modules."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops += int(formula(*args, **kwargs, out_val=out))
        return out


def conv_reference() -> tuple[float, Callable[[], None]]:
    """FLOPs and one call of a Conv2d 64→64, 3×3 on 1×64×256² (channels-last, fp32) forward + backward."""
    conv = torch.nn.Conv2d(64, 64, 3, padding=1).to(memory_format=torch.channels_last)
    x = torch.randn(1, 64, 256, 256).contiguous(memory_format=torch.channels_last).requires_grad_()

    def run() -> None:
        x.grad = None
        conv.zero_grad(set_to_none=True)
        conv(x).sum().backward()

    return 3 * 2.0 * 64 * 64 * 9 * 256**2, run  # forward, input gradient, weight gradient


def build(overrides: dict[str, Any], variant: str):
    """The plug-in's :class:`~medmodal.engine.plugin.Training` of ``multimix_tiny`` with ``overrides``."""
    from medmodal.engine.plugin import get_method
    from medmodal.engine.recipe import builtin_recipe_path, load_recipe

    torch.manual_seed(0)
    recipe = load_recipe(builtin_recipe_path("multimix_tiny"), overrides={**overrides, "method.variant": variant})
    built = get_method("multimix").build(recipe)
    built.data.setup("fit")
    return built


def train_step(system: Any, batches: list[dict[str, torch.Tensor]], *, channels_last: bool) -> Callable[[], None]:
    """One optimiser step of ``system`` per call, cycling through ``batches`` (``setup()`` needs a trainer, so
    the memory format is set here the way it sets it)."""
    system.channels_last = channels_last
    system.network.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    system.network.train()
    opt = system.configure_optimizers()["optimizer"]
    count = [0]

    def run() -> None:
        batch = batches[count[0] % len(batches)]
        count[0] += 1
        opt.zero_grad(set_to_none=True)
        system.losses(batch)["loss"].backward()
        opt.step()

    return run


def copy_system(system: Any) -> Any:
    """An independent copy of ``system`` (same weights, own optimiser state), for the contiguous run."""
    import copy

    return copy.deepcopy(system)


def loader(dataset: Any) -> Callable[[], object]:
    """One ``StreamSteps`` item per call, walking through the epoch."""
    count = [0]

    def run() -> object:
        item = dataset[count[0] % len(dataset)]
        count[0] += 1
        return item

    return run


def run_rounds(rows: list[Timed], *, rounds: int, warmup: int) -> None:
    """``warmup + rounds`` rounds, each row's ``calls`` once per round; the warm-up rounds are not kept."""
    for i in range(warmup + rounds):
        for r in rows:
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(r.calls):
                r.fn()
            if i >= warmup:
                r.wall.append((time.perf_counter() - t0) / r.calls)
                r.cpu.append((time.process_time() - c0) / r.calls)


def paired(a: Timed, b: Timed) -> float:
    """Median over rounds of ``a``'s time / ``b``'s time in the same round."""
    return statistics.median(x / y for x, y in zip(a.wall, b.wall, strict=True))


def measure(label: str, overrides: dict[str, Any], *, rounds: int, warmup: int, batches: int,
            contiguous: bool) -> None:
    t0 = time.perf_counter()
    built = {v: build(overrides, v) for v in VARIANTS}
    full = built["multimix"]
    data = full.data.train_dataloader().dataset
    items = [data[j] for j in range(batches)]
    shapes = {k: tuple(v.shape) for k, v in items[0].items() if k.endswith("_image")}
    net = full.system.network
    params = sum(p.numel() for p in net.parameters())
    print(f"\n## {label}: built in {time.perf_counter() - t0:.0f} s; network {type(net).__name__} "
          f"{params / 1e3:,.0f}k parameters; streams (B, M, X, Y): "
          + ", ".join(f"{k.removesuffix('_image')} {list(s)}" for k, s in shapes.items()), flush=True)

    ref_flops, ref = conv_reference()
    rows = [Timed("reference Conv2d fwd+bwd", ref, REF_CALLS, ref_flops),
            Timed("load: multimix item (5 streams)", loader(data), LOAD_CALLS),
            Timed("load: umtl item (2 streams)", loader(built["umtl"].data.train_dataloader().dataset), LOAD_CALLS)]
    steps: dict[tuple[str, bool], Timed] = {}
    for v in VARIANTS:
        for cl in (True, False) if contiguous and v in CONTIGUOUS else (True,):
            system = built[v].system if cl else copy_system(built[v].system)
            t = Timed(f"step: {v}{'' if cl else ' (contiguous)'}", train_step(system, items, channels_last=cl))
            with CountFlops() as counter:
                t.fn()
            t.flops = float(counter.flops)
            steps[v, cl] = t
            rows.append(t)
    run_rounds(rows, rounds=rounds, warmup=warmup)
    ref_row = rows[0]

    base = steps["umtl", True]
    print(f"{'':<36}{'ms/call':>9}{'CPU ms':>8}{'GFLOP':>8}{'GFLOP/s':>9}{'/ref':>6}{'/umtl':>7}{'paired':>8}")
    for r in rows:
        flops = f"{r.flops / 1e9:>8.2f}{r.gflops():>9.1f}" if r.flops else f"{'':>17}"
        rel = f"{r.gflops() / ref_row.gflops():>6.0%}" if r.flops and r is not ref_row else f"{'':>6}"
        vs = (f"{r.median / base.median:>7.2f}{paired(r, base):>8.2f}" if r.name.startswith("step")
              else f"{'':>15}")
        print(f"{r.name:<36}{r.median * 1e3:>9.1f}{statistics.median(r.cpu) * 1e3:>8.1f}{flops}{rel}{vs}")
    print(f"(median of {rounds} rounds after {warmup} warm-up; ms/call: wall clock; /ref: GFLOP/s relative to the "
          "reference; /umtl: s/step relative to umtl channels-last, as a ratio of medians and as the median of "
          "per-round ratios)")

    def verdict(a: str, b: str) -> str:
        ra, rb = steps[a, True], steps[b, True]
        estimates = (ra.median / rb.median, paired(ra, rb))
        word = ("PASS" if max(estimates) <= TARGET else "FAIL" if min(estimates) > TARGET
                else "UNDECIDED (the two estimates straddle the target: rerun with more rounds)")
        print(f"  {a} / {b}: {estimates[0]:.2f} (paired {estimates[1]:.2f}), extra "
              f"{(ra.flops / rb.flops - 1):+.0%} FLOPs -> {word}")
        return word.split()[0]

    print(f"target (issue 13): the saliency bridge adds at most {TARGET - 1:.0%} to a step (time ratio <= {TARGET}, "
          "both as a ratio of medians and paired):")
    words = {verdict("multimix", "umtl_ssl"), verdict("umtl_s", "umtl")}
    overall = "FAIL" if "FAIL" in words else "UNDECIDED" if "UNDECIDED" in words else "PASS"
    print(f"  -> {overall}; semi-supervision (views + streams): umtl_ssl / umtl "
          f"{paired(steps['umtl_ssl', True], base):.2f}, multimix / umtl {paired(steps['multimix', True], base):.2f} "
          "(paired)")
    load, step = rows[1], steps["multimix", True]
    print(f"data loading (num_workers 0 builds the next item between two steps): {load.median * 1e3:.1f} ms per "
          f"multimix item (umtl: {rows[2].median * 1e3:.1f} ms) = {load.median / step.median:.1%} of its "
          f"{step.median * 1e3:.0f} ms step -> loading takes {load.median / (load.median + step.median):.1%} of "
          "the training loop")
    if contiguous:
        for v in CONTIGUOUS:
            c, cl = steps[v, False], steps[v, True]
            print(f"channels-last vs contiguous, {v}: {c.median / cl.median:.2f}x faster "
                  f"(paired {paired(c, cl):.2f}x)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=30, help="rounds of the tiny configuration")
    p.add_argument("--warmup", type=int, default=2, help="rounds not kept")
    p.add_argument("--batches", type=int, default=4, help="pre-loaded items the steps cycle through")
    p.add_argument("--no-contiguous", action="store_true", help="skip the contiguous-format steps")
    p.add_argument("--spec-size", action="store_true", help="also the 256² spec network (widths 16..256, batch 10)")
    p.add_argument("--spec-repeats", type=int, default=3)
    p.add_argument("--spec-cases", type=int, default=120, help="images of the 256² phantom")
    p.add_argument("--only", choices=["tiny", "spec"], help="run one configuration (spec: implies --spec-size)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 2 rounds, 1 warm-up, no spec size")
    args = p.parse_args()
    if args.quick:
        args.repeats, args.warmup, args.batches, args.spec_size, args.only = 2, 1, 2, False, "tiny"
    if min(args.repeats, args.batches, args.spec_repeats) < 1 or args.warmup < 0 or args.spec_cases < 30:
        p.error("--repeats, --batches and --spec-repeats must be >= 1, --warmup >= 0, --spec-cases >= 30")
    torch.set_num_threads(args.threads)
    print(f"# MultiMix training-step cost, {datetime.datetime.now():%Y-%m-%dT%H:%M}, CPU, {args.threads} threads "
          f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}), torch {torch.__version__}; load average "
          f"{os.getloadavg()[0]:.1f} at the start")
    print(f"command: {shlex.join(['python', *sys.argv])}")
    if args.only == "spec":
        args.spec_size = True
    t0 = time.perf_counter()
    if args.only != "spec":
        measure("multimix_tiny: 64², widths 4..64, 5 streams x batch 8", {}, rounds=args.repeats,
                warmup=args.warmup, batches=args.batches, contiguous=not args.no_contiguous)
    if args.spec_size and args.only != "tiny":
        measure(f"spec size: 256², widths 16..256, 5 streams x batch 10 ({args.spec_cases}-image phantom)",
                {**SPEC, "data.phantom.cases": args.spec_cases}, rounds=args.spec_repeats, warmup=1,
                batches=min(args.batches, 2), contiguous=not args.no_contiguous)
    print(f"\n{time.perf_counter() - t0:.0f} s in all; load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
