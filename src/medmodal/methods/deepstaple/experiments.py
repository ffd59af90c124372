"""``medmodal experiment deepstaple``: DeepSTAPLE's claims checked on the synthetic phantom, written to ``report.md``.

* **Experiment I** (Weihsbach et al., WBIR 2022, exp. I): each target (a 2D T2 phantom slice) gets ``K`` labels
  disturbed from its true whole-tumour label with seeded transforms of known Dice
  (:mod:`medmodal.transforms.label_noise`). Data parameters are trained out-of-line (OOL) and in-line; we report
  the Spearman correlation of θ with the true Dice and the Dice of the DP consensus against majority vote, STAPLE
  (Warfield et al., TMI 2004), one random label and the mean of all labels.
* **Multi-atlas**: phantom cases are atlases (T1) and targets (T2) of a cross-contrast registration
  (:func:`medmodal.registration.atlases.register_atlases`); the atlas label is the **white matter** of the phantom's
  tissue map, because the phantom's tumours sit at random places and cannot be transferred between cases. The
  same fusions are scored against the targets' true white matter.

Everything is synthetic and the report says so. Nothing is tuned to make one method win.
"""

from __future__ import annotations

import csv
import io
import logging
import platform
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import torch

from medmodal.atomic import atomic_write_text
from medmodal.engine.recipe import Recipe, load_recipe, recipe_from_dict
from medmodal.engine.run import RunError
from medmodal.engine.train import train
from medmodal.evaluation.report import pyplot, save_figure
from medmodal.methods.deepstaple.labels import consensus_inputs

log = logging.getLogger("medmodal")
FUSIONS = ("dp", "staple", "majority", "random", "mean_all", "best")
FUSION_NAMES = {"dp": "DP consensus", "staple": "STAPLE", "majority": "majority vote", "random": "one random label",
                "mean_all": "all labels (mean Dice)", "best": "best single label (oracle)"}
STRUCTURE = "white_matter"


@dataclass
class LabelQuality:
    """How well θ ranks the labels and how good each fusion is, for one trained DeepSTAPLE run.

    Attributes:
        spearman, pearson: correlation of θ with the labels' true Dice (NaN when unknown).
        labels: the data-parameter rows (``theta`` and ``true_dice`` as floats).
        targets: per training target with a reference: ``target, n_labels`` and the Dice against the reference
            of ``dp`` (DP consensus), ``majority``, ``staple``, ``random`` (one seeded random label), ``mean_all``
            (mean Dice of all its labels) and ``best`` (its best single label, an oracle).
    """

    spearman: float
    pearson: float
    labels: list[dict]
    targets: list[dict]


def evaluate_label_quality(run_dir: Path, *, seed: int = 0) -> LabelQuality:
    """Correlate θ with the true label quality and score every fusion of each target's labels.

    STAPLE runs with the run's ``method.staple_backend`` (medmodal's float64 STAPLE or SimpleITK's).
    """
    from medmodal.evaluation.metrics import binary_dice
    from medmodal.fusion import dp_consensus, majority_vote, staple
    from medmodal.methods.deepstaple.system import pearson, spearman

    backend = load_recipe(Path(run_dir) / "recipe.yaml").method.staple_backend
    label_set, inputs = consensus_inputs(run_dir)
    rows = [{**r, "theta": float(r["theta"]), "true_dice": float(r["true_dice"] or "nan")}
            for _, _, rs in inputs.values() for r in rs]
    rng = np.random.default_rng(seed)
    targets = []
    for target, (masks, theta, _) in sorted(inputs.items()):
        ref = label_set.targets[target].reference
        if ref is None:
            continue
        each = [binary_dice(m, ref) for m in masks]
        fused = {"dp": dp_consensus(masks, theta), "majority": majority_vote(masks),
                 "staple": staple(masks, backend=backend).fused}
        targets.append({"target": target, "n_labels": len(masks),
                        **{k: binary_dice(np.asarray(v, bool), ref) for k, v in fused.items()},
                        "random": each[int(rng.integers(len(each)))], "mean_all": float(np.mean(each)),
                        "best": float(np.max(each))})
    th, dq = [r["theta"] for r in rows], [r["true_dice"] for r in rows]
    return LabelQuality(spearman(th, dq), pearson(th, dq), rows, targets)


@dataclass(frozen=True)
class Scale:
    """Sizes of one experiment run (the default and the ``--fast`` smoke test)."""

    targets: int = 16  # experiment I targets (a quarter is held out for validation)
    size: int = 48  # in-plane voxels of the 2D slices
    labels_per_target: int = 6
    epochs: int = 30
    batch_size: int = 8
    channels: tuple[int, ...] = (8, 16, 32)
    atlases: int = 6  # multi-atlas: atlases per target
    ma_targets: int = 10
    ma_size: int = 64
    ma_epochs: int = 30


DEFAULT, FAST = Scale(), Scale(targets=6, size=33, labels_per_target=4, epochs=4, batch_size=8, channels=(4, 8),
                               atlases=3, ma_targets=4, ma_size=40, ma_epochs=3)


def _n_train(n: int, val_fraction: float) -> int:
    return n - min(n - 1, max(1, round(val_fraction * n)))  # as medmodal.engine.datamodule.split_cases


def _recipe(name: str, data: dict, scale: Scale, *, epochs: int, n_labels: int, dp_update: str, seed: int,
            candidates: dict) -> Recipe:
    """The method's defaults (faithful learning-rate decay, weight-sum CE, whole batches) for ``epochs`` epochs of
    ``n_labels`` training labels (fewer steps per epoch if registrations fail: the run then has more epochs)."""
    steps = epochs * max(1, n_labels // scale.batch_size)  # method.drop_last: whole batches only
    return recipe_from_dict({
        "name": name, "seed": seed,
        "data": {**data, "batch_size": scale.batch_size, "val_fraction": 0.25, "num_workers": 0},
        "model": {"name": "unet", "kwargs": {"channels": list(scale.channels)}},
        "method": {"name": "deepstaple", "dp_update": dp_update, "candidates": candidates},
        "train": {"max_steps": steps, "lr": 0.01, "checkpoint_every_steps": steps, "progress": False,
                  "threads": torch.get_num_threads()},
        "eval": {"overlap": 0.0, "sw_batch_size": 1},
    })


def experiment_i_recipe(scale: Scale, *, dp_update: str, seed: int) -> Recipe:
    """Experiment I: 2D T2 phantom slices, ``K`` disturbed whole-tumour labels per target."""
    data = {"phantom": {"cases": scale.targets, "spatial_dims": 2, "size": scale.size, "seed": seed},
            "modalities": ["t2"], "patch_size": [scale.size, scale.size]}
    candidates = {"noise": {"labels_per_target": scale.labels_per_target, "seed": seed}}
    n = _n_train(scale.targets, 0.25) * scale.labels_per_target
    return _recipe(f"deepstaple_exp1_{dp_update}", data, scale, epochs=scale.epochs, n_labels=n,
                   dp_update=dp_update, seed=seed, candidates=candidates)


def _slice_case(case_id: str, seed: int, size: int, modality: str) -> object:
    """The axial mid-slice of a 3D phantom case: one modality and the white matter as a 0/1 label."""
    from medmodal.data.case import Case, Volume
    from medmodal.data.phantom import PHANTOM_TISSUES, make_phantom_case, phantom_tissue_map

    kw = {"spatial_dims": 3, "size": size, "spacing": (1.0, 1.0, size / 8)}  # 8 thick axial slices
    case = make_phantom_case(case_id=case_id, seed=seed, **kw)
    tissue = phantom_tissue_map(seed=seed, **kw)
    vol = case.images[modality]
    k = vol.shape[2] // 2
    affine = vol.affine.copy()
    affine[:3, 3] += affine[:3, 2] * k
    label = (tissue[:, :, k] == PHANTOM_TISSUES.index(STRUCTURE)).astype(np.uint8)
    return Case(case_id, {modality: Volume(np.ascontiguousarray(vol.array[:, :, k]), affine)},
                label=Volume(label, affine.copy()))


def make_multi_atlas_data(out: Path, scale: Scale, *, seed: int) -> tuple[Path, Path]:
    """Write ``out/atlases`` (T1 + white matter) and ``out/targets`` (T2 + true white matter), BraTS layout."""
    from medmodal.data.case import DatasetInfo
    from medmodal.data.formats import write_dataset

    def seeds(role: int, n: int) -> list[int]:
        return [int(np.random.SeedSequence([seed, role, i]).generate_state(1)[0]) for i in range(n)]

    for role, (name, n, modality) in enumerate((("atlases", scale.atlases, "t1"),
                                                 ("targets", scale.ma_targets, "t2"))):
        info = DatasetInfo(name=f"phantom-{name}", modalities=(modality,), labels=(0, 1),
                           regions={STRUCTURE: (1,)}, synthetic=True)
        prefix = "atlas" if role == 0 else "target"
        cases = (_slice_case(f"{prefix}{i:02d}", s, scale.ma_size, modality) for i, s in enumerate(seeds(role, n)))
        write_dataset(cases, out / name, info, format="brats", overwrite=True)  # type: ignore[arg-type]
    return out / "atlases", out / "targets"


def run_multi_atlas(out: Path, scale: Scale, *, seed: int) -> tuple[LabelQuality, Path]:
    """Register atlases onto targets (T1 → T2, B-spline), train DeepSTAPLE on the labels, evaluate the fusions."""
    from medmodal.registration.atlases import register_atlases

    atlases, targets = make_multi_atlas_data(out / "data", scale, seed=seed)
    reg = out / "registration"
    register_atlases(atlases, targets, reg, atlas_modality="t1", target_modality="t2", transform="bspline",
                     overwrite=True, progress=False)
    data = {"path": str(targets), "format": "brats", "modalities": ["t2"], "patch_size": [scale.ma_size] * 2}
    n = _n_train(scale.ma_targets, 0.25) * scale.atlases
    recipe = _recipe("deepstaple_multi_atlas", data, scale, epochs=scale.ma_epochs, n_labels=n, dp_update="ool",
                     seed=seed, candidates={"manifest": str(reg / "manifest.csv")})
    run = train(recipe, out / "run", overwrite=True)
    return evaluate_label_quality(run, seed=seed), reg / "manifest.csv"


# -- tables and figures ---------------------------------------------------------------------------------------


def _summary(q: LabelQuality) -> dict[str, tuple[float, float]]:
    return {k: (float(np.mean([t[k] for t in q.targets])), float(np.std([t[k] for t in q.targets])))
            for k in FUSIONS} if q.targets else {}


def fusion_table(results: dict[str, LabelQuality]) -> str:
    """Markdown: one row per run, Spearman(θ, Dice) and mean ± std Dice of each fusion."""
    head = ["run", "labels", "Spearman ρ(θ, Dice)", "Pearson r", *(FUSION_NAMES[k] for k in FUSIONS),
            "DP > STAPLE"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, q in results.items():
        s = _summary(q)
        wins = sum(t["dp"] > t["staple"] for t in q.targets)
        cells = [f"{s[k][0]:.3f} ± {s[k][1]:.3f}" if s else "–" for k in FUSIONS]
        lines.append(f"| {name} | {len(q.labels)} | {q.spearman:.3f} | {q.pearson:.3f} | " + " | ".join(cells)
                     + f" | {wins}/{len(q.targets)} |")
    return "\n".join(lines)


def write_targets_csv(q: LabelQuality, path: Path) -> Path:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["target", "n_labels", *FUSIONS])
    w.writeheader()
    w.writerows({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in t.items()} for t in q.targets)
    atomic_write_text(path, buf.getvalue())
    return path


def plot_theta_vs_dice(results: dict[str, LabelQuality], path: Path, *, title: str) -> Path:
    """One scatter panel per run: learned θ against each label's true Dice, coloured by disturbance."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.6), squeeze=False,
                             constrained_layout=True)
    for ax, (name, q) in zip(axes[0], results.items(), strict=True):
        kinds = sorted({(r["detail"].split() or ["-"])[0] for r in q.labels})
        for kind in kinds:
            pts = [(r["true_dice"], r["theta"]) for r in q.labels if (r["detail"].split() or ["-"])[0] == kind]
            ax.scatter(*zip(*pts, strict=True), s=14, alpha=0.8, label=kind)
        ax.set(xlabel="true Dice of the label", ylabel="learned θ", title=f"{name}: Spearman {q.spearman:.2f}")
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def plot_fusion_strip(q: LabelQuality, path: Path, *, title: str) -> Path:
    """Per-target Dice of each fusion (box plot with the targets as points)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 3.6), constrained_layout=True)
    data = [[t[k] for t in q.targets] for k in FUSIONS]
    ax.boxplot(data, showfliers=False)
    rng = np.random.default_rng(0)
    for i, values in enumerate(data, start=1):
        ax.scatter(i + rng.uniform(-0.12, 0.12, len(values)), values, s=12, alpha=0.8)
    ax.set_xticks(range(1, len(FUSIONS) + 1), [FUSION_NAMES[k].replace(" (", "\n(") for k in FUSIONS], fontsize=7)
    ax.set(ylabel="Dice vs true label", ylim=(0, 1.02))
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def _registration_summary(manifest: Path) -> str:
    with manifest.open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    ok = [r for r in rows if (r.get("status") or "ok") == "ok"]
    dice = [float(r["dice_to_reference"]) for r in ok if r.get("dice_to_reference") not in (None, "")]
    secs = [float(r["seconds"]) for r in ok if r.get("seconds")]
    text = f"{len(ok)}/{len(rows)} registrations succeeded"
    if dice:
        text += (f"; registered-label Dice vs the true white matter: mean {np.mean(dice):.3f}, min {min(dice):.3f},"
                 f" max {max(dice):.3f}")
    if secs:
        text += f"; {np.mean(secs):.2f} s per registration"
    return text


def run_deepstaple_experiments(out: Path, *, fast: bool = False, overwrite: bool = False, seed: int = 0) -> Path:
    """Run both experiments into ``out`` and write ``out/report.md`` (with CSV tables and PNG figures)."""
    out = Path(out)
    report = out / "report.md"
    if report.exists() and not overwrite:
        raise RunError(f"{report}: a finished experiment is there; pass --overwrite or choose another --out")
    scale = FAST if fast else DEFAULT
    t0 = time.perf_counter()
    exp1: dict[str, LabelQuality] = {}
    for update in ("ool", "inline"):
        run = train(experiment_i_recipe(scale, dp_update=update, seed=seed), out / "exp1" / update, overwrite=True)
        exp1[f"exp. I, {update}"] = evaluate_label_quality(run, seed=seed)
        write_targets_csv(exp1[f"exp. I, {update}"], out / f"exp1_{update}_targets.csv")
    plot_theta_vs_dice(exp1, out / "exp1_theta_vs_dice.png", title="Experiment I (synthetic phantom): θ vs true Dice")
    plot_fusion_strip(exp1["exp. I, ool"], out / "exp1_fusion.png",
                      title="Experiment I (synthetic), OOL: per-target Dice of each fusion")
    t1 = time.perf_counter()
    ma, manifest = run_multi_atlas(out / "multi_atlas", scale, seed=seed)
    write_targets_csv(ma, out / "multi_atlas_targets.csv")
    plot_fusion_strip(ma, out / "multi_atlas_fusion.png",
                      title=f"Multi-atlas (synthetic, T1 atlases → T2 targets, {STRUCTURE}): per-target Dice")
    plot_theta_vs_dice({"multi-atlas, ool": ma}, out / "multi_atlas_theta_vs_dice.png",
                       title="Multi-atlas (synthetic): θ vs registered-label Dice")
    t2 = time.perf_counter()
    s1 = experiment_i_recipe(scale, dp_update="ool", seed=seed)
    s0 = s1.method
    lines = [
        "# DeepSTAPLE on the synthetic phantom",
        "",
        "**All data here are synthetic** (medmodal's procedural phantom); the numbers say how the implementation "
        "behaves, not how it performs on patients. Method: Weihsbach et al., *DeepSTAPLE*, WBIR 2022 (data "
        "parameters after Saxena et al., NeurIPS 2019); STAPLE after Warfield et al., IEEE TMI 2004.",
        "",
        f"- command: `medmodal experiment deepstaple --out {out}{' --fast' if fast else ''} --seed {seed}`",
        f"- time: experiment I {(t1 - t0) / 60:.1f} min, multi-atlas {(t2 - t1) / 60:.1f} min on "
        f"{torch.get_num_threads()} CPU thread(s), {platform.processor() or platform.machine()}; "
        f"{date.today().isoformat()}",
        f"- network: 2D U-Net, channels {list(scale.channels)}, 2 softmax classes, AdamW lr 0.01 decayed "
        f"×{s0.lr_gamma} per batch in epochs 0, {s0.lr_decay_every}, {2 * s0.lr_decay_every}, …, SparseAdam lr 0.1 "
        f"for θ, batch {scale.batch_size} (whole batches only); model step class-weighted CE / sum of weights; "
        f"risk regulariser on, fixed weighting ln(n+e)+e; DP loss unweighted CE; STAPLE backend "
        f"{s0.staple_backend}; validation once per epoch",
        "- fusions are scored on the training targets (those with data parameters) against their true labels; "
        "DP consensus = 1[Σ softmax(θ)·y > 0.5] over each target's labels; 'best single label' is an oracle",
        "",
        "## Experiment I: disturbed true labels",
        "",
        f"{scale.targets} targets (2D T2 slices through the tumour, {scale.size}² voxels, {s1.data.phantom.cases} "
        f"phantom cases, seed {seed}), a quarter held out for validation; {scale.labels_per_target} labels per "
        "target, each a seeded disturbance of the true whole-tumour mask (elastic warp, dilation/erosion, shift, "
        f"flip-roll or emptied) of known Dice; {scale.epochs} epochs.",
        "",
        fusion_table(exp1),
        "",
        "![θ vs true Dice](exp1_theta_vs_dice.png)",
        "",
        "![per-target Dice](exp1_fusion.png)",
        "",
        "## Multi-atlas: registered labels",
        "",
        f"{scale.atlases} atlases (T1) registered onto each of {scale.ma_targets} targets (T2) with a B-spline "
        f"transform (cross-contrast); 2D axial mid-slices of 3D phantom cases ({scale.ma_size}² voxels). Atlas "
        f"label: the phantom's **{STRUCTURE}** (the tumours sit at random places in different cases, so transferring "
        f"them by registration would be meaningless). {_registration_summary(manifest)}. DeepSTAPLE (OOL) trained "
        f"{scale.ma_epochs} epochs on the registered labels of the training targets.",
        "",
        fusion_table({"multi-atlas, ool": ma}),
        "",
        "![per-target Dice](multi_atlas_fusion.png)",
        "",
        "![θ vs Dice](multi_atlas_theta_vs_dice.png)",
        "",
        "Per-target values: `exp1_ool_targets.csv`, `exp1_inline_targets.csv`, `multi_atlas_targets.csv`; run folders "
        "(recipe, metrics.csv, data_parameters.csv) under `exp1/` and `multi_atlas/`.",
        "",
    ]
    atomic_write_text(report, "\n".join(lines))
    return report
