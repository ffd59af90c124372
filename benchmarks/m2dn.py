"""M2DN sampling cost and quality against sampler steps (issue 12, spec ``shared/methods/m2dn.md``).

**Cost** (always; a randomly initialised denoiser: speed does not depend on the weights). The CPU recipe's network
(``m2dn_tiny``: ``m2dn_denoiser`` width 16, channels 32/32, time_dim 64) on 64² slices of four modalities, one of
them missing, under the T = 1000 linear schedule of the spec:

* seconds per synthesised 2D slice (batch 1) for DDIM 10/20/50/100 steps (η = 0) and the full DDPM chain of
  1000 steps. Chains of at most ``--measure-up-to`` steps (default 1000: all) are run whole; longer ones are
  **extrapolated**: the seconds per step of the same sampler measured on a shorter chain (DDPM: a respaced
  ``--ddpm-probe``-step chain, whose steps do the same work as the full chain's) times the steps. The table says
  which is which.
* a "155-slice volume" (4 × 64² × 155, the axial depth of BraTS) filled slice by slice by
  :func:`medmodal.methods.m2dn.inference.fill_case` in batches of ``--volume-batches`` slices: ``--volume-steps``
  DDIM steps are measured on the whole volume and multiplied up to 50 (every DDIM step does the same work), and
  the achieved GFLOP/s is compared with one large ``Conv2d`` (64→64, 3×3, 1×64×256², float32) timed in the same
  run, interleaved with everything else (5 calls in a row per round), on the same threads (the issue's target:
  ≥ 30 %). The ``Conv3d`` reference of ``benchmarks/evaluation.py`` is printed too, to compare with the other
  tables of docs/benchmarks.md. Batch 16 is what ``medmodal evaluate``/``synthesize`` use (``run.json``
  ``inference.batch_size``). Without 1 in ``--volume-batches``, batch 1 is derived from the single-slice chain.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` over one denoiser forward (convolutions and
matrix products, a multiply-add = 2 FLOPs; norms, activations and the sampler's element-wise update are not
counted) and multiplied by the network evaluations of the call. ``--spec-network`` also times the spec's default
network (``m2dn_denoiser`` defaults) on one 256² slice.

**Quality** (``--run RUN``, a trained M2DN run folder): PSNR of the run's synthesis on its validation cases under
every missing scenario (:func:`medmodal.methods.m2dn.evaluate.synthesis_rows`, the numbers ``medmodal evaluate``
reports) for the full DDPM chain of the run's T and DDIM with fewer steps, the gap to the full chain in dB, and
the issue's target (DDIM with ≥ 10× fewer steps within 0.5 dB). ``--figure PATH`` writes PSNR against steps.

Each timing is the median of ``--repeats`` rounds; on a shared machine compare the ratios of one run, not runs.
Example (the figures in docs/benchmarks.md)::

    OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE MEDMODAL_CACHE=/tmp/bench_cache \\
        python benchmarks/m2dn.py --threads 2 --repeats 3 --run /tmp/bench_m2dn --figure /tmp/m2dn_psnr_steps.png
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

# benchmarks/evaluation.py: the Conv3d reference and the FLOP counter of the other tables (this script's folder
# is on sys.path when it is run as ``python benchmarks/m2dn.py``).
from evaluation import conv_reference, flops_of, profile_top

MODS = ("t1", "t1c", "t2", "flair")
RECIPE_NET = {"width": 16, "channels": [32, 32], "time_dim": 64}  # src/medmodal/recipes/m2dn_tiny.yaml
SLICE_SETTINGS = (("ddim", 10), ("ddim", 20), ("ddim", 50), ("ddim", 100), ("ddpm", 1000))
VOLUME_STEPS = 50
REF_CALLS = 5


def conv2d_reference() -> tuple[float, Callable[[], object]]:
    """FLOPs and a call of one large Conv2d (64→64, 3×3, 1×64×256²): the machine's 2D convolution speed."""
    conv = torch.nn.Conv2d(64, 64, 3, padding=1).eval()
    x = torch.randn(1, 64, 256, 256)

    def run() -> object:
        with torch.inference_mode():
            return conv(x)

    return 2.0 * 64 * 64 * 9 * 256**2, run


def forward_flops(net: torch.nn.Module, size: int) -> float:
    """FLOPs of one denoiser forward on one ``(1, M, size, size)`` slice (linear in the batch)."""
    x = torch.zeros(1, len(MODS), size, size)
    available = torch.tensor([[True, True, True, False]])
    with torch.inference_mode():
        return flops_of(lambda: net(x, available, torch.zeros(1, dtype=torch.long)))


def slice_chain(net: torch.nn.Module, diffusion, sampler: str, steps: int, size: int) -> Callable[[], torch.Tensor]:
    """One 64² slice, FLAIR missing, through ``steps`` sampler steps (fixed seed)."""
    from medmodal.methods.m2dn.inference import SamplerSettings, fill_missing

    x = torch.rand(1, len(MODS), size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    available = torch.tensor([[True, True, True, False]])
    settings = SamplerSettings(sampler=sampler, steps=steps)  # type: ignore[arg-type]

    def run() -> torch.Tensor:
        return fill_missing(net, x, available, mode="diffusion", diffusion=diffusion, settings=settings,
                            generator=torch.Generator().manual_seed(0))

    return run


def volume_fill(net: torch.nn.Module, diffusion, *, slices: int, size: int, steps: int,
                batch: int) -> Callable[[], torch.Tensor]:
    """A ``(M, size, size, slices)`` volume, FLAIR missing, filled slice by slice in batches of ``batch``."""
    from medmodal.methods.m2dn.inference import SamplerSettings, fill_case

    image = torch.rand(len(MODS), size, size, slices, generator=torch.Generator().manual_seed(0)) * 2 - 1
    patterns = torch.tensor([[True, True, True, False]])
    settings = SamplerSettings(sampler="ddim", steps=steps)

    def run() -> torch.Tensor:
        return fill_case(net, image, patterns, model_dims=2, mode="diffusion", diffusion=diffusion,
                         settings=settings, batch_size=batch, generator=torch.Generator().manual_seed(0))

    return run


def timed(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each call, the calls interleaved round by round (load from other processes hits all)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def cost(args: argparse.Namespace) -> None:
    from medmodal.methods.m2dn.diffusion import MaskedDiffusion
    from medmodal.networks.registry import create_network

    torch.manual_seed(0)
    net = create_network("m2dn_denoiser", spatial_dims=2, modalities=MODS, out_channels=len(MODS),
                         **RECIPE_NET).eval()
    diffusion = MaskedDiffusion(timesteps=1000)  # the spec's linear schedule, β 1e-4 .. 2e-2
    size, n_slices = args.size, args.slices
    f1 = forward_flops(net, size)
    params = sum(p.numel() for p in net.parameters())

    fns: dict[str, Callable[[], object]] = {}
    ref2_flops, conv2d = conv2d_reference()
    ref3_flops, conv3d = conv_reference()
    # each round times the references REF_CALLS times in a row (a single call is ~20 ms: load spikes dominate it)
    fns["conv2d"] = lambda: [conv2d() for _ in range(REF_CALLS)]
    fns["conv3d"] = lambda: [conv3d() for _ in range(REF_CALLS)]
    measured = [(s, n) for s, n in SLICE_SETTINGS if n <= args.measure_up_to]
    for s, n in measured:
        fns[f"slice/{s}/{n}"] = slice_chain(net, diffusion, s, n, size)
    probe = min(args.ddpm_probe, args.measure_up_to)
    if not any(s == "ddpm" for s, _ in measured):
        fns[f"slice/ddpm/{probe}"] = slice_chain(net, diffusion, "ddpm", probe, size)
    for b in args.volume_batches:
        fns[f"volume/{b}"] = volume_fill(net, diffusion, slices=n_slices, size=size, steps=args.volume_steps,
                                         batch=b)
    warm = {1, *(min(b, n_slices) for b in args.volume_batches), *(n_slices % b for b in args.volume_batches)}
    with torch.inference_mode():  # warm-up: one forward per batch size the calls use
        for b in warm - {0}:
            net(torch.zeros(b, len(MODS), size, size), torch.ones(b, len(MODS), dtype=torch.bool),
                torch.zeros(b, dtype=torch.long))
    fns["conv2d"](), fns["conv3d"]()
    t = timed(fns, args.repeats)
    t["conv2d"], t["conv3d"] = t["conv2d"] / REF_CALLS, t["conv3d"] / REF_CALLS
    g2 = ref2_flops / t["conv2d"] / 1e9
    g3 = ref3_flops / t["conv3d"] / 1e9

    print(f"\nnetwork: m2dn_denoiser {RECIPE_NET} (the m2dn_tiny recipe's), random weights, {params / 1e3:,.0f}k "
          f"parameters, {f1 / 1e9:.3f} GFLOP per forward of one {size}² slice; schedule T = 1000 (linear)")
    print(f"reference Conv2d 64->64, 3x3, 1x64x256^2: {ref2_flops / 1e9:.2f} GFLOP in {t['conv2d'] * 1e3:.0f} ms "
          f"= {g2:.1f} GFLOP/s; Conv3d 32->32, 3^3, 1x32x64^3 (benchmarks/evaluation.py): {g3:.1f} GFLOP/s")

    # seconds per step of each sampler at batch 1, from its longest measured chain
    per_step = {}
    for s in ("ddim", "ddpm"):
        runs = [(n, t[k]) for k in t if k.startswith(f"slice/{s}/") for n in [int(k.rsplit("/", 1)[1])]]
        n, sec = max(runs)
        per_step[s] = (sec / n, n)
    vol_step = {b: t[f"volume/{b}"] / args.volume_steps for b in args.volume_batches}
    best_b = min(vol_step, key=vol_step.get)  # type: ignore[arg-type]
    ddpm_s = per_step["ddpm"][0] * 1000
    print(f"\n## seconds per synthesised {size}² slice against sampler steps (median of {args.repeats})")
    print(f"{'sampler':<8}{'steps':>6}  {'how':<30}{'s/slice, batch 1':>17}{'GFLOP/s':>9}{'speed-up':>9}"
          f"{f's/slice, batch {best_b}':>18}{f's/{n_slices}-slice vol.':>19}")
    for s, n in SLICE_SETTINGS:
        key = f"slice/{s}/{n}"
        if key in t:
            sec, how = t[key], "measured (whole chain)"
        else:
            sec, how = per_step[s][0] * n, f"{per_step[s][1]}-step chain x {n / per_step[s][1]:g}"
        vol = vol_step[best_b] * n
        print(f"{s.upper():<8}{n:>6}  {how:<30}{sec:>17.2f}{f1 * n / sec / 1e9:>9.1f}{ddpm_s / sec:>8.0f}x"
              f"{vol / n_slices:>18.3f}{vol:>19.1f}")
    print(f"(speed-up: against DDPM 1000 at batch 1; the last two columns: {args.volume_steps} measured DDIM steps "
          f"of the whole volume in batches of {best_b}, per step x steps)")

    print(f"\n## a {n_slices}-slice volume ({len(MODS)} x {size}² x {n_slices}, FLAIR missing) at {VOLUME_STEPS} DDIM "
          f"steps, slices batched (fill_case)")
    print(f"{'batch':>6}  {'how':<44}{'s/step':>8}{f's/vol ({VOLUME_STEPS} st.)':>15}{'GFLOP/s':>9}"
          f"{'of Conv2d':>10}{'of Conv3d':>10}")
    rows = [(1, per_step["ddim"][0] * n_slices, f"single slice x {n_slices} (DDIM {per_step['ddim'][1]}-step)")]
    rows = [r for r in rows if 1 not in vol_step]
    rows += [(b, vol_step[b], f"measured: {args.volume_steps} DDIM step(s), whole volume") for b in vol_step]
    for b, step_s, how in sorted(rows):
        g = f1 * n_slices / step_s / 1e9
        print(f"{b:>6}  {how:<44}{step_s:>8.2f}{step_s * VOLUME_STEPS:>15.1f}{g:>9.1f}{g / g2:>10.0%}{g / g3:>10.0%}")
    best_g = f1 * n_slices / vol_step[best_b] / 1e9
    print(f"target (issue 12): >= 30 % of the Conv2d's GFLOP/s: {best_g / g2:.0%} at batch {best_b} -> "
          f"{'met' if best_g / g2 >= 0.30 else 'NOT met'}")
    if args.profile:
        b = max(args.volume_batches)
        print(f"\n## profile: one DDIM step of the volume in batches of {b}\n" + profile_top(
            volume_fill(net, diffusion, slices=n_slices, size=size, steps=1, batch=b), args.profile))

    if args.spec_network:
        spec = create_network("m2dn_denoiser", spatial_dims=2, modalities=MODS, out_channels=len(MODS)).eval()
        fs = forward_flops(spec, 256)
        chain = slice_chain(spec, diffusion, "ddim", args.spec_steps, 256)
        chain()
        sec = timed({"spec": chain}, args.repeats)["spec"] / args.spec_steps
        mparams = sum(p.numel() for p in spec.parameters()) / 1e6
        print(f"\n## the spec's default network (m2dn_denoiser defaults, {mparams:.1f}M parameters) on one 256² slice: "
              f"{fs / 1e9:.1f} GFLOP/forward, {sec:.2f} s/step measured over "
              f"DDIM {args.spec_steps} steps ({fs / sec / 1e9:.1f} GFLOP/s, {fs / sec / 1e9 / g2:.0%} of the Conv2d "
              f"measured above) -> extrapolated: DDIM 50 {sec * 50:.0f} s, DDPM 1000 {sec * 1000 / 60:.0f} min "
              "per slice")


def load_m2dn_run(path: Path):
    """The trained M2DN diffusion run at ``path`` (:class:`~medmodal.engine.runinfo.LoadedRun`), or ``RunError``."""
    from medmodal.engine.run import RunError
    from medmodal.engine.runinfo import load_run

    run = load_run(path)
    if run.info.method != "m2dn" or run.info.inference.get("mode", "diffusion") != "diffusion":
        raise RunError(f"--run {path}: not an M2DN diffusion run (method {run.info.method}, mode "
                       f"{run.info.inference.get('mode')}); train one with `medmodal train m2dn_tiny --out DIR`")
    return run


def quality(args: argparse.Namespace, run) -> None:
    from medmodal.engine.cases import evaluation_cases
    from medmodal.methods.m2dn import diffusion_of
    from medmodal.methods.m2dn.evaluate import synthesis_rows
    from medmodal.methods.m2dn.inference import case_patterns, settings_from

    inf = run.info.inference
    T = diffusion_of(inf).timesteps
    cases, where, _ = evaluation_cases(run, split=args.split, data=None, progress=False)
    cases = cases[: args.max_cases]
    if args.batch_size:
        inf["batch_size"] = args.batch_size  # synthesis_rows reads the run's recorded batch size
    ddim = sorted({n for n in (*args.psnr_steps, max(1, T // 10)) if n < T}, reverse=True)
    base = settings_from(inf)
    settings = [dataclasses.replace(base, sampler="ddpm", steps=None, eta=0.0)]
    settings += [dataclasses.replace(base, sampler="ddim", steps=n, eta=0.0) for n in ddim]
    n_items = sum(len(case_patterns(np.asarray(c.available, bool))) for c in cases)
    print(f"\n## PSNR against sampler steps: run {run.dir} ({run.recipe.name}, trained weights, T = {T}, "
          f"{inf.get('beta_schedule')} schedule); {len(cases)} cases of {where}; every missing scenario "
          f"({n_items} synthesised images, batches of {inf.get('batch_size', 16)}); seed {base.seed}")
    results = []
    for st in settings:
        t0 = time.perf_counter()
        rows = synthesis_rows(run, cases, model_name="m2dn", settings=st, baselines=False)
        sec = time.perf_counter() - t0
        results.append((st, np.array([r.psnr for r in rows]), np.array([r.ssim for r in rows]), sec))
    ref = results[0][1]
    print(f"{'sampler':<8}{'steps':>6}{'fewer':>7}{'PSNR dB':>9}{'SSIM':>7}{'gap dB':>8}{'naive 95% CI':>18}"
          f"{'s/image':>9}")
    gaps = {}
    for st, psnr, ssim, sec in results:
        n = st.steps or T
        ok = np.isfinite(psnr) & np.isfinite(ref)
        d = psnr[ok] - ref[ok]  # paired: same case, scenario and modality
        half = 1.96 * d.std(ddof=1) / math.sqrt(d.size) if d.size > 1 else float("nan")
        gaps[n if st.sampler == "ddim" else -1] = float(d.mean())
        ci = f"[{d.mean() - half:+.2f}, {d.mean() + half:+.2f}]" if st.sampler == "ddim" else ""
        mean = float(np.mean(psnr[np.isfinite(psnr)]))
        print(f"{st.sampler.upper():<8}{n:>6}{T / n:>6.0f}x{mean:>9.2f}{np.mean(ssim):>7.3f}{d.mean():>+8.2f}{ci:>18}"
              f"{sec / n_items:>9.2f}")
    print(f"(gap: paired mean of PSNR − the DDPM {T}-step chain's over the {ref.size} (case, scenario, modality) "
          f"scores, CI treating them as independent; s/image: wall time of the whole evaluation / images, "
          "measured once)")
    tenfold = [n for n in gaps if n > 0 and T / n >= 10]
    within = [n for n in tenfold if gaps[n] >= -0.5]
    if tenfold:
        n10 = max(tenfold)
        print(f"target (issue 12): DDIM with >= 10x fewer steps than the full chain within 0.5 dB: DDIM {n10} "
              f"{gaps[n10]:+.2f} dB -> {'met' if gaps[n10] >= -0.5 else 'NOT met'}"
              + (f"; fewest steps within 0.5 dB: DDIM {min(within)} ({gaps[min(within)]:+.2f} dB)" if within else ""))
    if args.figure:
        from medmodal.evaluation.synthesis import metric_vs_steps_figure

        full = float(np.mean(results[0][1][np.isfinite(results[0][1])]))
        psnrs = [float(np.mean(p[np.isfinite(p)])) for _, p, _, _ in results[1:]]
        path = metric_vs_steps_figure(
            Path(args.figure), ddim, {"DDIM (eta 0)": psnrs, f"DDPM, full chain ({T} steps)": [full] * len(ddim),
                                      "full chain - 0.5 dB": [full - 0.5] * len(ddim)},
            ylabel="PSNR (dB, foreground)", title=f"M2DN {run.recipe.name}: PSNR against sampler steps")
        print(f"figure: {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--size", type=int, default=64, help="slice size (the CPU recipe's 64²)")
    p.add_argument("--slices", type=int, default=155, help="slices of the volume")
    p.add_argument("--volume-batches", type=int, nargs="+", default=[1, 8, 16, 32, 155],
                   help="slices per sampler call (without 1, batch 1 is derived from the single-slice chain)")
    p.add_argument("--volume-steps", type=int, default=5, help="DDIM steps measured on the whole volume")
    p.add_argument("--measure-up-to", type=int, default=1000,
                   help="single-slice chains of at most this many steps run whole; longer ones are extrapolated")
    p.add_argument("--ddpm-probe", type=int, default=20, help="steps of the respaced DDPM chain timed per step")
    p.add_argument("--spec-network", action="store_true", help="also time the spec's 256² default network")
    p.add_argument("--spec-steps", type=int, default=2)
    p.add_argument("--run", type=Path, help="a trained M2DN run folder: PSNR against steps")
    p.add_argument("--split", default="val", choices=["val", "train", "all"])
    p.add_argument("--max-cases", type=int, default=8, help="cases of the split scored per sampler setting")
    p.add_argument("--batch-size", type=int, help="images per sampler call in the PSNR runs (default: the run's)")
    p.add_argument("--psnr-steps", type=int, nargs="+", default=[100, 50, 20, 10, 5],
                   help="DDIM steps scored (those below the run's T, plus T/10)")
    p.add_argument("--figure", type=Path, help="write PSNR against steps (PNG) here; needs --run")
    p.add_argument("--profile", type=int, default=0, metavar="ROWS",
                   help="print torch.profiler's top ROWS operators of one DDIM step of the volume at the largest batch")
    p.add_argument("--no-cost", action="store_true", help="skip the timing tables")
    p.add_argument("--quick", action="store_true", help="a smoke run: 1 repeat, short chains, small volume")
    args = p.parse_args()
    if args.figure and not args.run:
        p.error("--figure needs --run RUN (a trained M2DN run folder)")
    run = None
    if args.run:
        from medmodal.engine.run import RunError

        try:
            run = load_m2dn_run(args.run)
        except RunError as e:
            p.error(str(e))
    if args.quick:
        args.repeats, args.measure_up_to, args.ddpm_probe, args.slices, args.volume_steps = 1, 10, 5, 32, 1
        args.volume_batches, args.max_cases, args.psnr_steps = [8, 16], 1, [10]
    if min(args.volume_batches) < 1 or args.volume_steps < 1 or args.measure_up_to < 10:
        p.error("--volume-batches and --volume-steps must be >= 1 and --measure-up-to >= 10")
    torch.set_num_threads(args.threads)
    print(f"# M2DN sampling cost and quality against steps, {datetime.datetime.now():%Y-%m-%dT%H:%M}, CPU, "
          f"{args.threads} threads (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}), torch "
          f"{torch.__version__}; load average {os.getloadavg()[0]:.1f} at the start")
    print(f"command: {shlex.join(['python', *sys.argv])}")
    if os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
        print("note: OMP_WAIT_POLICY is not PASSIVE: with other processes on the cores, 2-thread OpenMP calls of "
              "this small network can stall (0.8 s per 5 ms forward seen here); set OMP_WAIT_POLICY=PASSIVE")
    t0 = time.perf_counter()
    if not args.no_cost:
        cost(args)
    if run is not None:
        from medmodal.engine.run import RunError

        try:
            quality(args, run)
        except RunError as e:
            p.error(str(e))
    print(f"\n{time.perf_counter() - t0:.0f} s in all; load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
