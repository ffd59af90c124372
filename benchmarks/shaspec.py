"""ShaSpec (Wang et al., CVPR 2023) vs the zero-fill U-Net baseline: training cost, memory over time,
all-subset evaluation in one pass vs a forward per subset, and the batched vs looped shared encoder.

Each training measurement runs in a fresh process, so its peak memory (``ru_maxrss``, or CUDA's peak
allocation on a GPU) is its own. Example (the figures in docs/benchmarks.md)::

    python benchmarks/shaspec.py --patch 32 --batch 2 --iters 200 --eval-size 48 --repeats 3
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import resource
import statistics
import time

import torch

MODS = ("t1", "t1c", "t2", "flair")
REGIONS = {"WT": (1, 2, 4), "TC": (1, 4), "ET": (4,)}


def _peak_mib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _train(name: str, channels: tuple[int, ...], patch: int, batch: int, iters: int, threads: int, device: str,
           queue: mp.Queue) -> None:
    """Child process: ``iters`` training iterations with random subsets; reports times and peak memory."""
    from medmodal.losses.segmentation import RegionDiceBCELoss
    from medmodal.losses.shaspec import dao_loss, dco_loss
    from medmodal.networks.registry import create_network
    from medmodal.transforms import sample_modality_subsets

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = create_network(name, spatial_dims=3, modalities=MODS, out_channels=3, channels=channels).to(device)
    net = net.to(memory_format=torch.channels_last_3d)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    loss_fn = RegionDiceBCELoss()
    g = torch.Generator().manual_seed(0)
    times, peaks = [], {}
    for it in range(1, iters + 1):
        x = torch.randn(batch, 4, patch, patch, patch, device=device).contiguous(memory_format=torch.channels_last_3d)
        target = (torch.rand(batch, 3, patch, patch, patch, device=device) > 0.9).float()
        keep = sample_modality_subsets(torch.ones(batch, 4, dtype=torch.bool), p=1.0, sampler="by_size",
                                       generator=g).to(device)
        t0 = time.perf_counter()
        opt.zero_grad()
        if name == "shaspec":
            out = net.forward_features(x, keep)
            loss = loss_fn(out.logits, target) + 0.1 * dao_loss(out.shared, keep) + 0.02 * dco_loss(
                out.domain_logits, keep)
        else:
            loss = loss_fn(net(x, keep), target)
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        if it in (20, iters):
            peaks[it] = _peak_mib(device)
    params = sum(p.numel() for p in net.parameters())
    queue.put({"s_per_it": statistics.median(times[2:]), "params": params, "peaks": peaks})


def train_cost(name: str, channels: tuple[int, ...], args: argparse.Namespace) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_train, args=(name, channels, args.patch, args.batch, args.iters, args.threads,
                                         args.device, q))
    p.start()
    out = q.get()
    p.join()
    return out


def eval_times(args: argparse.Namespace) -> dict:
    """All 15 subsets of one case: one pass vs a batched forward per subset vs one sweep per subset (the
    evaluation against the machine's convolution speed: benchmarks/evaluation.py)."""
    from medmodal.evaluation.inference import nonempty_subsets, predict_subsets, subset_masks
    from medmodal.networks.registry import create_network

    torch.manual_seed(0)
    net = create_network("shaspec", spatial_dims=3, modalities=MODS, out_channels=3,
                         channels=tuple(args.shaspec_channels)).eval().to(args.device)
    s = args.eval_size
    image = torch.randn(1, 4, s, s + 3, s - 3, device=args.device)
    masks = subset_masks(MODS, nonempty_subsets(MODS))
    roi = (args.patch,) * 3
    kw = dict(roi_size=roi, overlap=1 / 3, blend="mean_prob")  # the spec's rule; window batch: auto

    def one_pass():
        return predict_subsets(net, image, masks, one_pass=True, **kw)

    def batched_per_subset():
        return predict_subsets(net, image, masks, one_pass=False, **kw)

    def sweep_per_subset():
        return torch.cat([predict_subsets(net, image, masks[k : k + 1], one_pass=False, **kw)
                          for k in range(len(masks))])

    out, times = {}, {"one pass (encode once, decode 15)": [], "forward per subset, batched": [],
                      "one sweep per subset": []}
    fns = dict(zip(times, (one_pass, batched_per_subset, sweep_per_subset), strict=True))
    for _ in range(args.repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            out[name] = fn()
            times[name].append(time.perf_counter() - t0)
    ref = out["one sweep per subset"]
    diff = max(float((v - ref).abs().max()) for v in out.values())
    return {"times": {k: statistics.median(v) for k, v in times.items()}, "max_abs_diff": diff}


def encoder_times(args: argparse.Namespace) -> dict:
    """The shared encoder on B*M inputs: one batched call vs a loop over modalities (forward + backward)."""
    from medmodal.networks.unet import UNetEncoder

    torch.manual_seed(0)
    enc = UNetEncoder(spatial_dims=3, in_channels=1, channels=tuple(args.shaspec_channels)).to(args.device)
    enc = enc.to(memory_format=torch.channels_last_3d)
    p, b = args.patch, args.batch
    x = torch.randn(b * 4, 1, p, p, p, device=args.device).contiguous(memory_format=torch.channels_last_3d)

    def batched():
        enc.zero_grad()
        sum(f.mean() for f in enc(x)).backward()

    def looped():
        enc.zero_grad()
        sum(sum(f.mean() for f in enc(x[m * b : (m + 1) * b])) for m in range(4)).backward()

    times = {"batched (1 call of B*M)": [], "looped (M calls of B)": []}
    for _ in range(args.repeats * 3):
        for name, fn in zip(times, (batched, looped), strict=True):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--patch", type=int, default=32, help="training crop and evaluation window (cube)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--iters", type=int, default=200, help="training iterations (memory read at 20 and here)")
    p.add_argument("--eval-size", type=int, default=48, help="evaluation volume size (about this cube)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--unet-channels", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--shaspec-channels", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {args.threads} threads"
    print(f"# ShaSpec benchmark, {datetime.date.today()}, {where}; crop {args.patch}^3, batch {args.batch}")

    print(f"\n## training ({args.iters} iterations, random modality subsets, AdamW; peak memory of the process)")
    print(f"{'model':<34}{'params':>10}{'s/iter':>9}{'peak MiB @20':>14}{'peak MiB @' + str(args.iters):>15}")
    for name, ch in (("unet", args.unet_channels), ("shaspec", args.shaspec_channels)):
        r = train_cost(name, tuple(ch), args)
        label = f"{name} {tuple(ch)}"
        print(f"{label:<34}{r['params'] / 1e3:>9.0f}k{r['s_per_it']:>9.3f}{r['peaks'][20]:>14.0f}"
              f"{r['peaks'][args.iters]:>15.0f}")

    e = eval_times(args)
    base = e["times"]["one sweep per subset"]
    print(f"\n## all 15 subsets of one {args.eval_size}^3 case, sliding windows {args.patch}^3 "
          f"(median of {args.repeats}; max |difference| {e['max_abs_diff']:.1e})")
    for k, v in e["times"].items():
        print(f"{k:<40}{v:>8.2f} s   {base / v:>5.2f}x vs one sweep per subset")

    t = encoder_times(args)
    b, loop = t["batched (1 call of B*M)"], t["looped (M calls of B)"]
    print(f"\n## shared encoder {tuple(args.shaspec_channels)}, forward + backward, B={args.batch}, M=4")
    for k, v in t.items():
        print(f"{k:<40}{v * 1e3:>8.1f} ms")
    print(f"{'batched speed-up':<40}{loop / b:>8.2f}x")


if __name__ == "__main__":
    main()
