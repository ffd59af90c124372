"""``medmodal evaluate`` on a DeepSTAPLE run: the network's Dice on its targets and how well θ ranks the labels."""

from __future__ import annotations

import logging
import math
from datetime import date
from pathlib import Path

import numpy as np
import torch

from medmodal.atomic import atomic_write_text, write_csv
from medmodal.engine.run import RunError
from medmodal.engine.runinfo import LoadedRun
from medmodal.evaluation.inference import predict_subsets, recorded_settings
from medmodal.evaluation.report import SYNTHETIC_NOTE

log = logging.getLogger("medmodal")


def evaluate_deepstaple(run: LoadedRun, out_dir: Path, *, split: str, progress: bool) -> Path:
    """Write ``targets.csv`` (Dice of the network's foreground against each target's reference) and
    ``report.md`` (mean Dice, and the Spearman correlation of θ with the labels' known quality)."""
    from medmodal.evaluation.metrics import binary_dice
    from medmodal.methods.deepstaple.labels import load_label_set, read_data_parameters
    from medmodal.methods.deepstaple.system import spearman

    label_set = load_label_set(run.recipe)
    ids = sorted(label_set.targets) if split == "all" else run.split(split)
    network = run.network()
    inf = run.info.inference
    rows = []
    for target in ids:
        t = label_set.targets[target]
        if t.reference is None or t.image is None:
            continue
        logits = predict_subsets(network, torch.from_numpy(t.image)[None],
                                 torch.from_numpy(t.available.astype(bool))[None],
                                 **recorded_settings(inf, task_kind=run.info.task.kind))
        pred = (logits[0].argmax(0) != 0).numpy()
        rows.append([target, f"{binary_dice(pred, t.reference):.6f}", int(pred.sum()), int(t.reference.sum())])
    if not rows:
        raise RunError(f"no target with a reference label in split {split!r} of {run.dir}")
    params = read_data_parameters(run.dir)
    theta = [float(r["theta"]) for r in params]
    true = [float(r["true_dice"]) if r["true_dice"] else float("nan") for r in params]
    rho = spearman(theta, true)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(out_dir / "targets.csv", ["target", "dice", "predicted_voxels", "reference_voxels"], rows)
    d = np.array([float(r[1]) for r in rows])
    text = [f"# {run.recipe.name}: DeepSTAPLE network and data parameters", ""]
    text += [SYNTHETIC_NOTE, ""] if run.info.training_data.get("synthetic") else []
    text += [
        f"- run: `{run.dir}`; split: {split} ({len(rows)} target(s) with a reference label); "
        f"date: {date.today().isoformat()}",
        f"- network foreground Dice against the references: mean {d.mean():.3f} ± {d.std():.3f} "
        f"(min {d.min():.3f}, max {d.max():.3f}); per target in `targets.csv`",
        f"- data parameters: {len(theta)} training labels; Spearman ρ(θ, true Dice) = "
        + (f"{rho:.3f}" if math.isfinite(rho) else "n/a (the labels' quality is unknown)"),
        "- fuse the training targets' labels with `medmodal fuse --method dp --run RUN --out DIR`",
        "",
    ]
    return atomic_write_text(out_dir / "report.md", "\n".join(text))
