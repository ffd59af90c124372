"""Training-step time of the quickstart U-Net: channels-last 3D memory format (medmodal's default) vs PyTorch's
default contiguous format, on the same input.

Example::

    python benchmarks/train_step.py --patch 48 --batch 2 --steps 12 --repeats 3
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import torch

from medmodal.losses.segmentation import RegionDiceBCELoss
from medmodal.networks.registry import create_network


def step_time(*, channels_last: bool, patch: int, batch: int, steps: int, seed: int = 0) -> float:
    """Median seconds of one optimiser step (forward, backward, AdamW) after two warm-up steps."""
    torch.manual_seed(seed)
    net = create_network("unet", spatial_dims=3, modalities=("t1", "t1c", "t2", "flair"), out_channels=3,
                         channels=(8, 16, 32, 64))
    x = torch.randn(batch, 4, patch, patch, patch)
    available = torch.ones(batch, 4, dtype=torch.bool)
    target = (torch.rand(batch, 3, patch, patch, patch) > 0.9).float()
    if channels_last:
        net = net.to(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)
    opt = torch.optim.AdamW(net.parameters())
    loss_fn = RegionDiceBCELoss()
    times = []
    for _ in range(steps + 2):
        t0 = time.perf_counter()
        opt.zero_grad()
        loss_fn(net(x, available), target).backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--patch", type=int, default=48)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--repeats", type=int, default=3, help="alternating runs of each variant")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    runs: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.repeats):
        for cl in (False, True):
            runs[cl].append(step_time(channels_last=cl, patch=args.patch, batch=args.batch, steps=args.steps))
    default, last = statistics.median(runs[False]), statistics.median(runs[True])
    print(f"quickstart U-Net (8,16,32,64), batch {args.batch}, {args.patch}^3 patch, {args.threads} threads, CPU")
    print(f"{'memory format':<26}{'s/step (median)':>16}   runs")
    print(f"{'contiguous (default)':<26}{default:>16.3f}   {', '.join(f'{t:.3f}' for t in runs[False])}")
    print(f"{'channels_last_3d (ours)':<26}{last:>16.3f}   {', '.join(f'{t:.3f}' for t in runs[True])}")
    print(f"speed-up: {default / last:.2f}x")
    print(f"date: {datetime.datetime.now().isoformat(timespec='seconds')}   torch {torch.__version__}")


if __name__ == "__main__":
    main()
