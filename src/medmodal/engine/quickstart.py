"""``medmodal quickstart``: phantom → train → evaluate every modality subset → ``report.md``."""

from __future__ import annotations

import csv
import logging
import platform
import time
from datetime import date
from pathlib import Path

import torch

from medmodal.engine.datamodule import phantom_dir
from medmodal.engine.evaluate import evaluate_run
from medmodal.engine.recipe import builtin_recipe_path, load_recipe
from medmodal.engine.run import RunError, atomic_write_text
from medmodal.engine.train import train
from medmodal.evaluation.report import plot_training_curves

log = logging.getLogger("medmodal")


def _last_metrics(metrics_csv: Path) -> dict[str, float]:
    last: dict[str, float] = {}
    if metrics_csv.is_file():
        with metrics_csv.open(encoding="utf-8") as f:
            for row in csv.DictReader(f):
                last[row["name"]] = float(row["value"])
    return last


def run_quickstart(out: Path, *, fast: bool = False, overwrite: bool = False) -> Path:
    """Run the main job into ``out`` and return the path of ``out/report.md``.

    An interrupted quickstart resumes where it stopped (training from its last checkpoint; a finished training
    is only evaluated); a finished quickstart is kept unless ``overwrite``.
    """
    out = Path(out)
    report = out / "report.md"
    run_dir = out / "run"
    if report.exists() and not overwrite:
        raise RunError(f"{report}: a finished quickstart is there; pass --overwrite or choose another --out")
    recipe = load_recipe(builtin_recipe_path("quickstart_fast" if fast else "quickstart"))
    if fast:
        recipe.train.progress = False
    t0 = time.perf_counter()
    trained = (run_dir / "split.json").is_file() and (run_dir / "weights" / "model.safetensors").is_file()
    if trained and not overwrite:
        log.info("training in %s is finished; evaluating it", run_dir)
    elif (run_dir / "checkpoints" / "last.ckpt").is_file() and not overwrite:
        log.info("resuming the interrupted quickstart in %s", run_dir)
        train(None, run_dir, resume=True)
    else:
        train(recipe, run_dir, overwrite=True)
    t_train = time.perf_counter() - t0
    rows = evaluate_run(run_dir, out_dir=out / "eval", progress=not fast, overwrite=True)
    t_total = time.perf_counter() - t0

    metrics = _last_metrics(run_dir / "metrics.csv")
    plot_training_curves(run_dir / "metrics.csv", out / "training_curves.png",
                         title="quickstart training (synthetic phantom)")
    eval_md = (out / "eval" / "report.md").read_text(encoding="utf-8")
    ph = recipe.data.phantom
    header = [
        "# medmodal quickstart",
        "",
        f"Zero-fill multi-modal U-Net trained with random modality dropout on the **synthetic phantom** "
        f"({ph.cases} cases, {ph.spatial_dims}D, {ph.size} voxels per axis, seed {ph.seed}; cached in "
        f"`{phantom_dir(ph)}`), evaluated on {len({r.case_id for r in rows})} held-out cases under every "
        "non-empty subset of {t1, t1c, t2, flair}.",
        "",
        f"- training: {recipe.train.max_steps} steps, batch {recipe.data.batch_size}, patch "
        f"{'×'.join(map(str, recipe.data.patch_size))}, "
        f"final train loss {metrics.get('train/loss', float('nan')):.3f}, "
        f"final validation Dice (all modalities) {metrics.get('val/dice_mean', float('nan')):.3f}",
        f"- time: training {t_train / 60:.1f} min, total {t_total / 60:.1f} min on {torch.get_num_threads()} "
        f"CPU thread(s), {platform.processor() or platform.machine()}; {date.today().isoformat()}",
        f"- run folder: `{run_dir}` (recipe, metrics.csv, checkpoints, weights); full tables in `eval/`",
        "",
        "![training curves](training_curves.png)",
        "",
    ]
    body = eval_md.split("\n", 1)[1].replace("](dice_heatmap.png)", "](eval/dice_heatmap.png)")
    atomic_write_text(report, "\n".join(header) + "\n## Dice per modality subset\n" + body)
    return report
