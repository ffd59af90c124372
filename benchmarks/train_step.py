"""Training-step efficiency: achieved GFLOP/s of a full training step of medmodal's networks against one large
Conv3d's forward + backward, and seconds per step against MONAI's DynUNet / BasicUNet of equal FLOPs.

A step is forward + loss + backward + SGD step (momentum 0.99, Nesterov; the recipes' optimiser) on a
channels-last 3D batch with every modality available. The zero-fill U-Net and the MONAI networks train with
``RegionDiceBCELoss``; ShaSpec adds its auxiliary losses as its training system does
(``0.1·dao_loss + 0.02·dco_loss``). FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` over one
whole step (convolutions and matrix products; norms, activations, losses and the optimiser are not counted);
the MONAI networks' widths are scaled until their step FLOPs are the nearest to ours (counted on the meta
device). Variants:

* ``before``: the same network with PyTorch's/MONAI's own layers (``nn.InstanceNorm3d``, 1×1 ``nn.Conv3d``),
  i.e. without :func:`medmodal.networks.unet.use_fast_layers`;
* ``grouped`` (ShaSpec only): the change proposed in ``/work/notes/shaspec_speed.patch``: fast layers in the
  decoder too, and the M specific encoders run as one grouped computation
  (:func:`medmodal.networks.unet.grouped_encoders`) when every slot is encoded.

Every variant of a configuration is built first, then steps run round-robin (one step of each in turn), so
load from other processes hits them alike; the table gives medians (wall clock and process CPU time).

Example (the figures in docs/benchmarks.md)::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/train_step.py --threads 2 --steps 5 --warmup 2
"""

from __future__ import annotations

import argparse
import datetime
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from monai.networks.nets import BasicUNet, DynUNet
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from medmodal.losses.segmentation import RegionDiceBCELoss
from medmodal.losses.shaspec import dao_loss, dco_loss
from medmodal.networks.registry import create_network
from medmodal.networks.shaspec import ShaSpecNet
from medmodal.networks.unet import (
    InstanceNorm,
    PointwiseConv3d,
    grouped_encoders,
    mask_missing,
    use_fast_layers,
)

MODS = ("t1", "t1c", "t2", "flair")
CL = torch.channels_last_3d


# --------------------------------------------------------------------------- variants
class _TorchInstanceNorm(nn.Module):
    """PyTorch's affine-free instance norm (what ``nn.InstanceNorm3d`` / MONAI's ``"instance"`` computes)."""

    def __init__(self, eps: float) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.instance_norm(x, eps=self.eps)


def torch_layers_(net: nn.Module) -> nn.Module:
    """Undo :func:`use_fast_layers`: PyTorch's instance norm and 1×1 ``nn.Conv3d`` (same parameters)."""
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, InstanceNorm):
                setattr(parent, name, _TorchInstanceNorm(child.eps))
            elif isinstance(child, PointwiseConv3d):
                conv = nn.Conv3d(child.in_channels, child.out_channels, 1, bias=child.bias is not None, device="meta")
                conv.weight, conv.bias = child.weight, child.bias
                setattr(parent, name, conv)
    return net


class _Precomputed(nn.Module):
    def __init__(self, feat: torch.Tensor) -> None:
        super().__init__()
        self.feat = feat

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.feat]


class GroupedShaSpec(ShaSpecNet):
    """ShaSpec with the specific encoders as one grouped computation (what the proposed patch does inside
    ``encode``; here the grouped result is handed to the unchanged ``ShaSpecNet.encode``)."""

    def encode(self, image: torch.Tensor, available: torch.Tensor):  # type: ignore[override]
        avail = self._check_input(image, available)
        if not (self.missing_input == "zero" or bool(avail.all())):
            return super().encode(image, available)
        x, _ = self._pad(mask_missing(image, avail))
        spec = grouped_encoders(list(self.specific_encoders.values()), x)[-1].unflatten(1, (len(self.modalities), -1))
        real = self.specific_encoders
        self._modules["specific_encoders"] = nn.ModuleDict(
            {name: _Precomputed(spec[:, m]) for m, name in enumerate(self.modalities)}
        )
        try:
            return super().encode(image, available)
        finally:
            self._modules["specific_encoders"] = real


class _MonaiNet(nn.Module):
    """A MONAI network under medmodal's ``forward(image, available)`` contract (missing channels zeroed)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        return self.net(mask_missing(image, available))


def dynunet(channels: Sequence[int]) -> nn.Module:
    n = len(channels)
    return _MonaiNet(DynUNet(spatial_dims=3, in_channels=4, out_channels=3, kernel_size=[3] * n,
                             strides=[1] + [2] * (n - 1), upsample_kernel_size=[2] * (n - 1),
                             filters=list(channels), norm_name="instance", res_block=False))


def basicunet(features: Sequence[int]) -> nn.Module:
    return _MonaiNet(BasicUNet(spatial_dims=3, in_channels=4, out_channels=3, features=tuple(features)))


# --------------------------------------------------------------------------- steps and FLOPs
@dataclass
class Workload:
    name: str
    widths: str
    net: nn.Module
    shaspec: bool = False
    same_flops_as: str | None = None
    profile: bool = False
    flops: float = 0.0
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)


def _loss(w: Workload, x: torch.Tensor, available: torch.Tensor, target: torch.Tensor,
          loss_fn: nn.Module) -> torch.Tensor:
    if w.shaspec:
        out = w.net.forward_features(x, available)
        return (loss_fn(out.logits, target) + 0.1 * dao_loss(out.shared, available)
                + 0.02 * dco_loss(out.domain_logits, available))
    return loss_fn(w.net(x, available), target)


def step_flops(make: Callable[[], nn.Module], batch: int, patch: Sequence[int], *, meta: bool = True) -> float:
    """FLOPs of forward + backward of a network, built on the meta device (no compute) where it can be."""
    with torch.device("meta" if meta else "cpu"):
        net = make()
        x = torch.zeros(batch, 4, *patch)
        available = torch.ones(batch, 4, dtype=torch.bool)
    with FlopCounterMode(display=False) as fc:
        net(x, available).sum().backward()
    return float(fc.get_total_flops())


def match_flops(make: Callable[[Sequence[int]], nn.Module], base: Sequence[int], target: float, batch: int,
                patch: Sequence[int]) -> tuple[list[int], float]:
    """Scale ``base`` widths by one factor so the step FLOPs come nearest ``target`` (FLOPs ~ width²)."""
    best: tuple[float, list[int], float] | None = None
    scale = 1.0
    for _ in range(4):
        widths = [max(1, round(c * scale)) for c in base]
        f = step_flops(lambda w=widths: make(w), batch, patch)
        if best is None or abs(math.log(f / target)) < abs(math.log(best[2] / target)):
            best = (scale, widths, f)
        if abs(f / target - 1) < 0.01:
            break
        scale *= math.sqrt(target / f)
    assert best is not None
    return best[1], best[2]


class ConvReference(nn.Module):
    """One Conv3d 32→32, 3³, on a fixed 1×32×64³ fp32 channels-last input: its "step" is forward + backward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(32, 32, 3, padding=1)
        self.x = torch.randn(1, 32, 64, 64, 64).contiguous(memory_format=CL).requires_grad_()

    def step(self) -> None:
        self.x.grad = None
        self.conv.zero_grad()
        self.conv(self.x).sum().backward()


def print_profile(w: Workload, step: Callable[[], None], rows: int = 12) -> None:
    """Self CPU time of one step by operator (torch.profiler), the ``rows`` largest with their share."""
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    print(f"\nprofile of one step of {w.name} {w.widths} (self CPU time by operator, {total / 1e6:.3f} s in all)")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:rows]:
        share = e.self_cpu_time_total / total
        print(f"  {e.key:<44}{e.count:>6} calls{e.self_cpu_time_total / 1e3:>10.1f} ms{share:>7.1%}")


def run_config(workloads: list[Workload], *, batch: int, patch: Sequence[int], steps: int, warmup: int,
               profile: bool = False, seed: int = 0) -> Workload:
    """Count every workload's step FLOPs, then time ``warmup + steps`` round-robin steps of each and of the
    Conv3d reference, which is returned (timed under the same load)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, *patch, generator=g).contiguous(memory_format=CL)
    available = torch.ones(batch, 4, dtype=torch.bool)
    target = (torch.rand(batch, 3, *patch, generator=g) > 0.9).float()
    loss_fn = RegionDiceBCELoss()
    torch.manual_seed(seed)
    ref = ConvReference().to(memory_format=CL)
    conv = Workload("one Conv3d (fwd+bwd)", "32->32, 1x32x64^3", ref)
    steps_of: dict[str, Callable[[], None]] = {conv.name: ref.step}
    for w in workloads:
        w.net = w.net.to(memory_format=CL)
        opt = torch.optim.SGD(w.net.parameters(), lr=1e-3, momentum=0.99, nesterov=True)

        def one_step(w: Workload = w, opt: torch.optim.Optimizer = opt) -> None:
            opt.zero_grad()
            _loss(w, x, available, target, loss_fn).backward()
            opt.step()

        steps_of[w.name] = one_step
    everything = [conv, *workloads]
    for w in everything:
        with FlopCounterMode(display=False) as fc:
            steps_of[w.name]()
        w.flops = float(fc.get_total_flops())
        if w.same_flops_as is not None:
            # FlopCounterMode counts a grouped convolution's weight gradient as if ungrouped (groups times
            # too many); the grouped variant does the same arithmetic as the network it regroups.
            w.flops = next(o.flops for o in everything if o.name == w.same_flops_as)
    if profile:
        for w in workloads:
            if w.profile:
                print_profile(w, steps_of[w.name])
    for i in range(warmup + steps):
        for w in everything:
            t0, c0 = time.perf_counter(), time.process_time()
            steps_of[w.name]()
            if i >= warmup:
                w.wall.append(time.perf_counter() - t0)
                w.cpu.append(time.process_time() - c0)
    return conv


def _rate(w: Workload) -> float:
    return w.flops / statistics.median(w.wall) / 1e9


def print_table(rows: list[tuple[str, Workload, Workload, Workload]]) -> None:
    """``rows``: (configuration, workload, the configuration's first (medmodal) network, its Conv3d)."""
    head = (f"{'configuration':<20}{'network':<26}{'widths':<23}{'GFLOP/step':>11}{'s/step':>8}{'CPU s':>7}"
            f"{'GFLOP/s':>9}{'/conv':>7}{'/ours':>7}")
    print(head)
    print("-" * len(head))
    last = None
    for config, w, ours, conv in rows:
        if config != last:
            print(f"{config:<20}{conv.name:<26}{conv.widths:<23}{conv.flops / 1e9:>11.2f}"
                  f"{statistics.median(conv.wall):>8.3f}{statistics.median(conv.cpu):>7.2f}{_rate(conv):>9.1f}")
            last = config
        wall, cpu = statistics.median(w.wall), statistics.median(w.cpu)
        print(f"{'':<20}{w.name:<26}{w.widths:<23}{w.flops / 1e9:>11.2f}{wall:>8.3f}{cpu:>7.2f}{_rate(w):>9.1f}"
              f"{_rate(w) / _rate(conv):>7.0%}{wall / statistics.median(ours.wall):>7.2f}")


# --------------------------------------------------------------------------- main
def build_workloads(net_name: str, channels: Sequence[int], batch: int, patch: Sequence[int],
                    monai: bool) -> list[Workload]:
    def ours() -> nn.Module:
        torch.manual_seed(0)
        cls = GroupedShaSpec if net_name == "shaspec_grouped" else None
        if cls is not None:
            return use_fast_layers(cls(spatial_dims=3, modalities=MODS, out_channels=3, channels=channels))
        return create_network(net_name, spatial_dims=3, modalities=MODS, out_channels=3, channels=channels)

    shaspec = net_name.startswith("shaspec")
    wl = [Workload(f"{'shaspec' if shaspec else 'unet (zero-fill)'}", str(list(channels)), ours(), shaspec,
                   profile=True)]
    torch.manual_seed(0)
    before = torch_layers_(create_network("shaspec" if shaspec else "unet", spatial_dims=3, modalities=MODS,
                                          out_channels=3, channels=channels))
    wl.append(Workload(f"{wl[0].name} before", str(list(channels)), before, shaspec))
    if shaspec:
        net_name = "shaspec_grouped"
        wl.append(Workload("shaspec grouped (patch)", str(list(channels)), ours(), True, same_flops_as=wl[0].name,
                           profile=True))
    if monai:
        target = step_flops(lambda: create_network("shaspec" if shaspec else "unet", spatial_dims=3,
                                                   modalities=MODS, out_channels=3, channels=channels),
                            batch, patch, meta=False)  # ShaSpec's gathers need real tensors
        dyn_w, _ = match_flops(dynunet, channels, target, batch, patch)
        base = [channels[0], channels[0], *channels[1:4], channels[0]]  # BasicUNet: 6 features, 4 downsamplings
        bas_w, _ = match_flops(basicunet, base, target, batch, patch)
        torch.manual_seed(0)
        wl.append(Workload("MONAI DynUNet", str(dyn_w), dynunet(dyn_w)))
        torch.manual_seed(0)
        wl.append(Workload("MONAI BasicUNet", str(bas_w), basicunet(bas_w)))
    return wl


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant (median)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--quick-patch", type=int, default=32)
    p.add_argument("--quick-batch", type=int, default=2)
    p.add_argument("--brats-patch", type=int, default=64)
    p.add_argument("--brats-batch", type=int, default=1)
    p.add_argument("--only", choices=["quick", "brats"], default=None, help="run one of the two patch sizes")
    p.add_argument("--no-monai", action="store_true", help="skip the MONAI networks")
    p.add_argument("--profile", action="store_true", help="print where one step of medmodal's networks spends time")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    configs = []
    if args.only in (None, "quick"):
        configs += [("unet", (8, 16, 32, 64), args.quick_patch, args.quick_batch, "quickstart"),
                    ("shaspec", (4, 8, 16, 32), args.quick_patch, args.quick_batch, "quickstart")]
    if args.only in (None, "brats"):
        configs += [("unet", (32, 64, 128, 256, 320), args.brats_patch, args.brats_batch, "BraTS widths"),
                    ("shaspec", (32, 64, 128, 256, 320), args.brats_patch, args.brats_batch, "BraTS widths")]
    rows = []
    for net_name, channels, patch, batch, label in configs:
        size = (patch,) * 3
        wl = build_workloads(net_name, channels, batch, size, not args.no_monai)
        conv = run_config(wl, batch=batch, patch=size, steps=args.steps, warmup=args.warmup, profile=args.profile)
        config = f"{net_name} {patch}^3 b{batch}"
        print(f"measured: {config} ({label})", flush=True)
        rows += [(config, w, wl[0], conv) for w in wl]
    print("\ntraining step = forward + loss + backward + SGD step, channels-last fp32, all modalities available; "
          f"median of {args.steps} steps after {args.warmup} warm-up, {args.threads} threads, steps of all rows of "
          "a configuration interleaved; FLOPs by FlopCounterMode over one step; /conv = GFLOP/s relative to the "
          "configuration's Conv3d row; /ours = s/step relative to the configuration's first row")
    print_table(rows)
    print(f"date: {datetime.datetime.now().isoformat(timespec='seconds')}   torch {torch.__version__}   CPU")


if __name__ == "__main__":
    main()
