"""All-subset evaluation at the machine's speed: one case under every modality subset, before and after.

For the quickstart's two models (ShaSpec 4/8/16/32 and the zero-fill U-Net 8/16/32/64, random weights: speed
does not depend on them) it times the sliding-window evaluation of one case under all 15 modality subsets
(window 32³, overlap 1/3, mean of probabilities) three ways:

* ``per subset, 1 window/call``: one sweep per subset, one window per network call, a forward per subset;
* ``all subsets, 1 window/call``: one sweep, each window run under the 15 subsets in one call (and ShaSpec's
  encode-once), one window per call: what the quickstart recipes did before (``sw_batch_size: 1``);
* ``all subsets, auto window batch``: a few window-subset samples a call (``MAX_BATCH_VOXELS``: 8 of 32³ on
  the CPU, the 15 subsets of a window in calls of 8 + 7), under ``torch.inference_mode``: the default now;
  ``, channels-last``: windows in the channels-last format, as ``evaluate`` feeds a network trained so
  (``train.channels_last``, the default). ``--all-windows`` adds every window and subset in one call.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` over the actual call of each way
(convolutions, transposed convolutions and matrix products, a multiply-add = 2 FLOPs; norms, activations and
the window blending are not counted). The reference is one large ``Conv3d`` (32→32 channels, 3³, input
1×32×64³, float32) timed in the same run, interleaved with the evaluations, on the same threads. Each figure is
the median of ``--repeats`` rounds; on a shared machine compare the ratios of one run, not runs.

Example (the figures in docs/benchmarks.md)::

    python benchmarks/evaluation.py --size 32 64 64 --roi 32 --threads 2 --repeats 5
"""

from __future__ import annotations

import argparse
import datetime
import os
import resource
import statistics
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

MODS = ("t1", "t1c", "t2", "flair")
MODELS = {"shaspec": (8, 16, 32, 64), "unet": (8, 16, 32, 64)}  # the quickstart's widths


def conv_reference() -> tuple[float, Callable[[], object]]:
    """FLOPs and a call of one large Conv3d (the machine's convolution speed)."""
    conv = torch.nn.Conv3d(32, 32, 3, padding=1).eval()
    x = torch.randn(1, 32, 64, 64, 64)

    def run() -> object:
        with torch.inference_mode():
            return conv(x)

    return 2.0 * 32 * 32 * 27 * 64**3, run


def evaluation_ways(net: torch.nn.Module, image: torch.Tensor, masks: torch.Tensor, *, roi: tuple[int, ...],
                    overlap: float, per_subset: bool, all_windows: bool) -> dict[str, Callable[[], torch.Tensor]]:
    from medmodal.evaluation.inference import predict_subsets

    kw = dict(roi_size=roi, overlap=overlap, blend="mean_prob")
    ways: dict[str, Callable[[], torch.Tensor]] = {}
    if per_subset:
        ways["per subset, 1 window/call"] = lambda: torch.cat([
            predict_subsets(net, image, masks[k : k + 1], sw_batch_size=1, one_pass=False, **kw)
            for k in range(len(masks))])
    ways["all subsets, 1 window/call"] = lambda: predict_subsets(net, image, masks, sw_batch_size=1, **kw)
    if all_windows:
        ways["all subsets, all windows/call"] = lambda: predict_subsets(net, image, masks, max_batch_voxels=2**30,
                                                                          **kw)
    ways["all subsets, auto window batch"] = lambda: predict_subsets(net, image, masks, **kw)
    ways["auto window batch, channels-last"] = lambda: predict_subsets(net, image, masks, channels_last=True, **kw)
    return ways


def flops_of(fn: Callable[[], object]) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def profile_top(fn: Callable[[], object], rows: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    return prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, nargs=3, default=[32, 64, 64], help="the case's spatial size")
    p.add_argument("--roi", type=int, default=32, help="sliding window (cube) = the training crop")
    p.add_argument("--overlap", type=float, default=1 / 3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--no-per-subset", action="store_true", help="skip the slowest way (one sweep per subset)")
    p.add_argument("--all-windows", action="store_true", help="also time every window of the case in one call")
    p.add_argument("--profile", type=int, default=0, metavar="ROWS",
                   help="print torch.profiler's top ROWS operators of the slowest and the auto way")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from medmodal.evaluation.inference import auto_window_batch, nonempty_subsets, subset_masks, window_count
    from medmodal.networks.registry import create_network

    size, roi = tuple(args.size), (args.roi,) * 3
    masks = subset_masks(MODS, nonempty_subsets(MODS))
    image = torch.randn(1, len(MODS), *size, generator=torch.Generator().manual_seed(0))
    n_win = window_count(size, roi, args.overlap)
    print(f"# all-subset evaluation, {datetime.date.today()}, CPU, {args.threads} threads "
          f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}), torch {torch.__version__}; "
          f"load average {os.getloadavg()[0]:.1f} at the start")
    print(f"case {'x'.join(map(str, size))}, window {args.roi}^3, overlap {args.overlap:.3g}: {n_win} windows x "
          f"{len(masks)} subsets; auto window batch {auto_window_batch(size, roi, args.overlap, len(masks))}; "
          f"median of {args.repeats}")

    ref_flops, ref = conv_reference()
    nets, ways, flops = {}, {}, {}
    for name in args.models:
        torch.manual_seed(0)
        nets[name] = create_network(name, spatial_dims=3, modalities=MODS, out_channels=3,
                                    channels=MODELS[name]).eval()
        ways[name] = evaluation_ways(nets[name], image, masks, roi=roi, overlap=args.overlap,
                                     per_subset=not args.no_per_subset, all_windows=args.all_windows)
        flops[name] = {way: flops_of(fn) for way, fn in ways[name].items()}  # also the warm-up
    ref()
    times: dict[str, list[float]] = {"conv": []}
    outputs: dict[tuple[str, str], torch.Tensor] = {}
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        ref()
        times["conv"].append(time.perf_counter() - t0)
        for name in args.models:
            for way, fn in ways[name].items():
                t0 = time.perf_counter()
                outputs[name, way] = fn()
                times.setdefault(f"{name}/{way}", []).append(time.perf_counter() - t0)
    conv_gflops = ref_flops / statistics.median(times["conv"]) / 1e9
    print(f"\nreference Conv3d 32->32, 3^3, 1x32x64^3: {ref_flops / 1e9:.1f} GFLOP in "
          f"{statistics.median(times['conv']) * 1e3:.0f} ms = {conv_gflops:.0f} GFLOP/s")
    print(f"\n{'model':<9}{'way':<34}{'s/case':>8}{'GFLOP':>7}{'GFLOP/s':>9}{'of Conv3d':>10}{'speed-up':>9}"
          f"{'max|dp|':>9}")
    for name in args.models:
        first = next(iter(ways[name]))
        base = statistics.median(times[f"{name}/{first}"])
        for way in ways[name]:
            t = statistics.median(times[f"{name}/{way}"])
            g = flops[name][way] / t / 1e9
            dp = float((outputs[name, way].sigmoid() - outputs[name, first].sigmoid()).abs().max())
            print(f"{name:<9}{way:<34}{t:>8.2f}{flops[name][way] / 1e9:>7.1f}{g:>9.1f}{g / conv_gflops:>10.0%}"
                  f"{base / t:>8.1f}x{dp:>9.1e}")
    print(f"\npeak resident memory of the process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} "
          f"MiB; load average {os.getloadavg()[0]:.1f} at the end")
    for name in args.models if args.profile else ():
        for way in (next(iter(ways[name])), "all subsets, auto window batch"):
            print(f"\n## profile: {name}, {way}\n{profile_top(ways[name][way], args.profile)}")


if __name__ == "__main__":
    main()
