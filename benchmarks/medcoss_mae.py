"""MedCoSS MAE training step against MONAI's ``MaskedAutoEncoderViT`` of the same size (issue 15, spec
``shared/methods/medcoss.md`` §2.1, §2.3).

One step = tokenize, keep 25 % of the grid tokens (75 % masking), encode the cls + kept tokens, decode every
position, norm-pix MAE loss over the masked patches (:func:`medmodal.losses.medcoss.mae_loss`, the same loss for
both), ``backward``, AdamW. Ours: :class:`~medmodal.networks.medcoss.MedCoSSEncoder` (pre-norm blocks of MONAI's
``SABlock`` with SDPA attention and ``MLPBlock``, drop-path 0.1 and layer scale as the spec, no final LayerNorm;
only the input's tokenizer built) + :class:`~medmodal.networks.medcoss.MAEDecoder`. MONAI: ``MaskedAutoEncoderViT``
with the same width, layers, heads, 4x MLP, qkv bias, decoder width / layers / heads, learnable positions (MONAI's
attention is its einsum path, it has a final encoder LayerNorm and no drop-path or layer scale).

Inputs (batch ``--batch``, default 8, patch 16): 2D ``(B, 3, 224, 224)``, 196 tokens; 3D ``(B, 1, 192, 192, 16)``,
144 tokens (the spec's 16 x 192 x 192 pre-training volume, slice axis last). Sizes: width ``--width`` (128),
``--depth`` (4) layers, ``--heads`` (4) heads; decoder width ``width / 2``, 2 layers, 4 heads: small enough for a
loaded 2-core machine (the spec's ViT-B is 768 / 12 / 12 with a 512 / 8 / 16 decoder).

Both steps run round-robin, one call each per round, so load from other processes hits both alike; the table gives
medians and the median of per-round ratios ("paired"); the verdict is PASS when both ratios are <= 1.05 (ours not
slower, 5 % allowed for the noise of a shared machine, as ``benchmarks/pumit.py``), FAIL when both exceed it,
UNDECIDED otherwise.

Example (the figures in docs/benchmarks.md)::

    OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE python benchmarks/medcoss_mae.py --threads 2
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
import time
from collections.abc import Callable

import torch

from medmodal.losses.medcoss import mae_loss, patchify, random_keep
from medmodal.networks.medcoss import MAEDecoder, MedCoSSEncoder
from multimix import Timed, paired, run_rounds  # this script's folder is on sys.path when run as a script
from pumit import adamw_step  # the same timed AdamW step as the PUMIT ViT comparison

MONAI_TARGET = 1.05
INPUTS = {"2D 224², 196 tokens": (3, (224, 224)), "3D 192²x16, 144 tokens": (1, (192, 192, 16))}
PATCH = 16


def mae_steps(
    *, channels: int, spatial: tuple[int, ...], batch: int, width: int, depth: int, heads: int
) -> tuple[Callable[[], None], Callable[[], None], int, int]:
    """The MedCoSS and MONAI MAE training steps on one input; also their parameter counts."""
    from monai.networks.nets import MaskedAutoEncoderViT

    dims = len(spatial)
    kind = f"image{dims}d"
    grid = tuple(s // PATCH for s in spatial)
    length = 1
    for g in grid:
        length *= g
    dec_width, dec_depth, dec_heads = width // 2, 2, 4
    torch.manual_seed(0)
    x = torch.randn(batch, channels, *spatial)
    encoder = MedCoSSEncoder(width=width, depth=depth, heads=heads, kinds=(kind,), patch_size_2d=PATCH,
                             patch_size_3d=PATCH, image_channels_2d=channels, image_channels_3d=channels,
                             **{f"pos_grid_{dims}d": grid}).train()  # type: ignore[arg-type]
    decoder = MAEDecoder(spatial_dims=dims, patch_size=PATCH, channels=channels, encoder_width=width,
                         width=dec_width, depth=dec_depth, heads=dec_heads, pos_grid=grid).train()
    generator = torch.Generator().manual_seed(0)
    target = patchify(x, PATCH)

    def ours() -> torch.Tensor:
        tokens = encoder.tokenize(kind, x)
        draw = random_keep(batch, length, generator=generator)
        pred = decoder(encoder.encode(tokens, keep=draw.keep), draw.keep, grid)
        return mae_loss(pred, target, draw.mask)

    monai = MaskedAutoEncoderViT(in_channels=channels, img_size=spatial, patch_size=PATCH, hidden_size=width,
                                 mlp_dim=4 * width, num_layers=depth, num_heads=heads, masking_ratio=0.75,
                                 decoder_hidden_size=dec_width, decoder_mlp_dim=4 * dec_width,
                                 decoder_num_layers=dec_depth, decoder_num_heads=dec_heads,
                                 pos_embed_type="learnable", decoder_pos_embed_type="learnable",
                                 spatial_dims=dims, qkv_bias=True).train()

    def theirs() -> torch.Tensor:
        pred, mask = monai(x)
        return mae_loss(pred, target, mask.bool())

    params = [*encoder.parameters(), *decoder.parameters()]
    n_ours, n_monai = sum(p.numel() for p in params), sum(p.numel() for p in monai.parameters())
    return adamw_step(params, ours), adamw_step(list(monai.parameters()), theirs), n_ours, n_monai


def verdict(a: Timed, b: Timed) -> str:
    estimates = (a.median / b.median, paired(a, b))
    word = "PASS" if max(estimates) <= MONAI_TARGET else "FAIL" if min(estimates) > MONAI_TARGET else "UNDECIDED"
    return f"{estimates[0]:.2f} (paired {estimates[1]:.2f}) -> {word}"


#: the section's settings when a caller's ``args`` lacks them (``benchmarks/medcoss.py`` may run this section)
DEFAULTS = {"repeats": 15, "warmup": 1, "batch": 8, "width": 128, "depth": 4, "heads": 4}


def mae_step_section(args: argparse.Namespace, ref: object = None) -> None:
    """The MAE-step comparison (module doc): one table row per input. ``args`` gives ``repeats``, ``warmup``,
    ``batch``, ``width``, ``depth``, ``heads`` (:data:`DEFAULTS` for any it lacks); ``ref`` (a machine reference of
    ``benchmarks/medcoss.py``'s ``SECTIONS`` signature) is not used."""
    args = argparse.Namespace(**{**DEFAULTS, **vars(args)})
    try:
        import einops  # noqa: F401  (MONAI's attention needs it)
    except ImportError as err:
        print(f"MONAI MaskedAutoEncoderViT comparison skipped: {err} (install einops, in the dev extra)")
        return
    rows: list[tuple[str, Timed, Timed, int, int]] = []
    for label, (channels, spatial) in INPUTS.items():
        ours, theirs, n_ours, n_monai = mae_steps(channels=channels, spatial=spatial, batch=args.batch,
                                                  width=args.width, depth=args.depth, heads=args.heads)
        rows.append((label, Timed(f"MedCoSS {label}", ours), Timed(f"MONAI {label}", theirs), n_ours, n_monai))
    print(f"\n## MAE training step vs MONAI MaskedAutoEncoderViT: width {args.width}, {args.depth} layers, "
          f"{args.heads} heads, decoder {args.width // 2} x 2 layers x 4 heads, patch {PATCH}, 75 % masked, "
          f"batch {args.batch}", flush=True)
    run_rounds([t for _, a, b, _, _ in rows for t in (a, b)], rounds=args.repeats, warmup=args.warmup)
    print(f"{'':<24}{'ours s':>8}{'MONAI s':>9}{'ours M':>8}{'MONAI M':>9}  ours / MONAI (target <= {MONAI_TARGET})")
    for label, a, b, n_a, n_b in rows:
        print(f"{label:<24}{a.median:>8.3f}{b.median:>9.3f}{n_a / 1e6:>8.2f}{n_b / 1e6:>9.2f}  {verdict(a, b)}")
    print(f"(seconds per step: median of {args.repeats} rounds after {args.warmup} warm-up, round-robin; M: "
          "parameters in millions; paired: the median of per-round ratios)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=DEFAULTS["repeats"], help="rounds kept")
    p.add_argument("--warmup", type=int, default=DEFAULTS["warmup"], help="rounds not kept")
    for name in ("batch", "width", "depth", "heads"):
        p.add_argument(f"--{name}", type=int, default=DEFAULTS[name])
    p.add_argument("--quick", action="store_true", help="a smoke run: 1 round, no warm-up, batch 2, width 32")
    args = p.parse_args()
    if args.quick:
        args.repeats, args.warmup, args.batch, args.width, args.depth = 1, 0, 2, 32, 1
    if min(args.repeats, args.batch, args.threads, args.depth) < 1 or args.warmup < 0 or args.width % args.heads:
        p.error("--repeats, --batch, --threads, --depth must be >= 1, --warmup >= 0, --width divisible by --heads")
    if (args.width // 2) % 4:
        p.error("--width / 2 (the decoder width) must be divisible by the decoder's 4 heads")
    torch.set_num_threads(args.threads)
    print(f"# MedCoSS MAE step, {datetime.datetime.now():%Y-%m-%dT%H:%M}, CPU, {args.threads} threads "
          f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}), torch {torch.__version__}; "
          f"load average {os.getloadavg()[0]:.1f} at the start")
    print(f"command: {shlex.join(['python', *sys.argv])}")
    t0 = time.perf_counter()
    mae_step_section(args)
    print(f"\n{time.perf_counter() - t0:.0f} s in all; load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
