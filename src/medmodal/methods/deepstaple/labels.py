"""DeepSTAPLE (Weihsbach et al., WBIR 2022): candidate labels, their data module, θ export and DP consensus.

A ``method.name: deepstaple`` recipe names its targets (``data.path`` or the phantom) and their candidate labels
(``method.candidates``: a registration manifest, or seeded disturbances of each target's own label).
:func:`build_deepstaple` returns the :class:`~medmodal.methods.deepstaple.DeepStapleSystem`, a
:class:`DeepStapleDataModule` of (target image, candidate label, label index) samples and the network kwargs;
training ends with ``RUN/data_parameters.csv`` (θ per label), which :func:`write_dp_consensus` uses to fuse each
target's labels. Images are preprocessed like every medmodal case (reorient, crop to non-zero, z-score) and the
labels are mapped onto that training grid; consensus labels are computed on each target's own grid.
"""

from __future__ import annotations

import csv
import io
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch
from nibabel.orientations import apply_orientation
from torch.utils.data import DataLoader, Dataset

from medmodal.atomic import atomic_write_text
from medmodal.data.case import Case, DataError, Volume
from medmodal.data.preprocess import CaseGeometry
from medmodal.engine.datamodule import resolve_source, select_modalities, split_cases
from medmodal.engine.distributed import RankShard, ValidationShard, per_rank_batch
from medmodal.engine.plugin import Training
from medmodal.engine.recipe import Recipe, RecipeError, load_recipe
from medmodal.engine.run import RunError
from medmodal.engine.runinfo import TaskInfo

log = logging.getLogger("medmodal")

MANIFEST_COLUMNS = ("target", "atlas", "label")
PARAMETER_COLUMNS = ("label_id", "target", "source", "path", "theta", "foreground_voxels", "true_dice", "detail")


@dataclass
class TargetImage:
    """One target: its preprocessed image (training grid), its own grid, and its reference label if known.

    Attributes:
        image: ``(M, *S) float32`` on the training grid (``None`` when loaded for consensus only).
        available: ``(M,) bool``.
        affine, shape: the target's own voxel grid (where consensus labels are written).
        reference: ``(*S_own) bool`` reference label on the own grid, or ``None``.
        geometry: how the own grid maps to the training grid.
    """

    target: str
    image: np.ndarray | None
    available: np.ndarray
    affine: np.ndarray
    shape: tuple[int, ...]
    reference: np.ndarray | None
    geometry: CaseGeometry | None = None


@dataclass
class CandidateLabel:
    """One candidate label of a target, on the training grid (``mask``) or the target's own grid."""

    target: str
    source: str  # atlas id, or "noise<k>" for synthetic labels
    mask: np.ndarray
    path: Path | None = None
    true_dice: float = float("nan")
    detail: str = ""


@dataclass
class LabelSet:
    """The targets (by id) and all their candidate labels, sorted by ``(target, source)``."""

    modalities: tuple[str, ...]
    targets: dict[str, TargetImage]
    labels: list[CandidateLabel] = field(default_factory=list)
    synthetic: bool = False


def _binary(array: np.ndarray, foreground: Sequence[int] | None) -> np.ndarray:
    return np.asarray(array) != 0 if foreground is None else np.isin(np.asarray(array), list(foreground))


def _to_training_grid(mask: np.ndarray, g: CaseGeometry | None) -> np.ndarray:
    """Map a mask on a target's own grid onto its training grid (orientation, resampling, crop)."""
    from medmodal.data.preprocess import resample_label

    assert g is not None
    out = apply_orientation(mask.astype(np.uint8), g.orientation)
    if g.target_spacing is not None:
        out = resample_label(out, g.resampled_shape)
    return np.ascontiguousarray(out[tuple(slice(a, b) for a, b in g.crop)]).astype(bool)


def read_registration_manifest(path: Path) -> list[dict[str, str]]:
    """Rows of a registration manifest with ``status`` ok (or no status column); checks columns and files."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"method.candidates.manifest: {path} not found; run `medmodal register` first")
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in MANIFEST_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}: missing column(s) {missing}; a registration manifest has columns "
                            f"{list(MANIFEST_COLUMNS)} (and status, dice_to_reference)")
        rows = list(reader)
    kept = [r for r in rows if (r.get("status") or "ok").strip().lower() == "ok"]
    if len(kept) < len(rows):
        log.warning("%s: %d row(s) whose status is not ok are left out", path, len(rows) - len(kept))
    problems = []
    for i, r in enumerate(kept, start=2):
        file = Path(r["label"]) if Path(r["label"]).is_absolute() else path.parent / r["label"]
        r["label"] = str(file)
        if not r["target"] or not r["atlas"]:
            problems.append(f"{path}, line {i}: empty target or atlas")
        elif not file.is_file():
            problems.append(f"{path}, line {i}: label file {file} not found")
    if problems:
        raise DataError("\n".join(problems[:10] + [f"({len(problems)} problems)"] * (len(problems) > 10)))
    if not kept:
        raise DataError(f"{path}: no usable registered label (every row failed or the manifest is empty)")
    return kept


def load_label_set(recipe: Recipe, *, training_grid: bool = True) -> LabelSet:
    """Read the targets and candidate labels of a DeepSTAPLE recipe (deterministic: synthetic labels are seeded).

    Args:
        training_grid: masks (and images) on the preprocessed training grid; ``False``: masks on each target's
            own grid and no image (for consensus), which also keeps the raw labels the consensus is written from.
    """
    from medmodal.data.io import read_case, read_image
    from medmodal.data.preprocess import preprocess_case
    from medmodal.evaluation.metrics import binary_dice
    from medmodal.transforms.label_noise import disturb_label, label_seed

    cand = recipe.method.candidates
    if cand is None:
        raise RecipeError("method.candidates: DeepSTAPLE needs candidate labels: set method.candidates.manifest "
                          "(registered labels) or method.candidates.noise (synthetic labels)")
    if cand.manifest is not None and recipe.data.path is None:
        raise RecipeError("data.path: a registration manifest needs the target data set it was registered onto")
    source = resolve_source(recipe.data)
    info, records = source.records()
    rows = read_registration_manifest(cand.manifest) if cand.manifest is not None else []
    wanted = {r["target"] for r in rows} if rows else {r.case_id for r in records}
    unknown = sorted(wanted - {r.case_id for r in records})
    if unknown:
        raise DataError(f"{cand.manifest}: target(s) {unknown[:5]} are not cases of data.path {recipe.data.path}")
    out = LabelSet(modalities=source.modalities, targets={}, synthetic=info.synthetic)
    for record in sorted((r for r in records if r.case_id in wanted), key=lambda r: r.case_id):
        case = read_case(select_modalities(record, source.modalities), info)
        ref_vol = case.reference
        reference = None if case.label is None else _binary(case.label.array, cand.foreground)
        image, available, geometry = None, case.available(source.modalities), None
        if training_grid:
            image, _, available, geometry = preprocess_case(
                Case(case.case_id, case.images), source.modalities, target_spacing=source.target_spacing,
                histogram_clip=source.histogram_clip)
        t = TargetImage(case.case_id, image, available, ref_vol.affine, ref_vol.shape, reference, geometry)
        out.targets[t.target] = t
        if cand.noise is not None:
            if reference is None:
                raise DataError(f"case {case.case_id!r}: synthetic candidate labels need the target's own label")
            noisy = disturb_label(reference, count=cand.noise.labels_per_target, kinds=cand.noise.kinds,
                                  max_severity=cand.noise.max_severity, seed=label_seed(cand.noise.seed, t.target))
            for k, n in enumerate(noisy):
                out.labels.append(CandidateLabel(t.target, f"noise{k:02d}", n.mask, None, n.dice,
                                                 n.disturbance.describe()))
    for r in rows:
        t = out.targets[r["target"]]
        vol = read_image(r["label"])
        if vol.shape != t.shape:
            raise DataError(f"{r['label']}: shape {vol.shape} differs from its target {t.target!r} {t.shape}; "
                            "registered labels must be resampled onto the target's grid")
        if not np.allclose(vol.affine[:3, : len(t.shape)], t.affine[:3, : len(t.shape)], atol=1e-2, rtol=1e-3):
            raise DataError(f"{r['label']}: not on the grid of its target {t.target!r} (the affines differ)")
        mask = _binary(vol.array, cand.foreground)
        known = float(r["dice_to_reference"]) if _is_float(r.get("dice_to_reference")) else float("nan")
        true = binary_dice(mask, t.reference) if t.reference is not None else known
        detail = f"registered (metric {r['metric']})" if r.get("metric") else "registered"
        out.labels.append(CandidateLabel(t.target, r["atlas"], mask, Path(r["label"]), true, detail))
    if training_grid:
        for lab in out.labels:
            lab.mask = _to_training_grid(lab.mask, out.targets[lab.target].geometry)
        for t in out.targets.values():
            if t.reference is not None:
                t.reference = _to_training_grid(t.reference, t.geometry)
    out.labels.sort(key=lambda lab: (lab.target, lab.source))
    return out


def _is_float(text: str | None) -> bool:
    try:
        return text is not None and np.isfinite(float(text))
    except ValueError:
        return False


class CandidateLabelDataset(Dataset):
    """(target image, candidate label, label index) samples; one epoch is a seeded shuffled pass over the labels.

    Items: ``{"image" (M, *P) float32, "available" (M,) bool, "label" (*P) long, "label_id" long}``; patches of
    ``patch_size`` at a random position (zero-padded where the image is smaller). With ``whole_batches_of=B`` an
    epoch is the first ``⌊N/B⌋·B`` labels of its shuffled order (``drop_last``: the labels left out change from
    epoch to epoch).
    """

    def __init__(self, *, labels: Sequence[CandidateLabel], targets: dict[str, TargetImage],
                 patch_size: Sequence[int], seed: int, whole_batches_of: int | None = None) -> None:
        self.labels, self.targets = list(labels), targets
        self.patch_size, self.seed, self.epoch = tuple(int(p) for p in patch_size), seed, 0
        self._order: tuple[int, np.ndarray] | None = None
        n = len(self.labels)
        self.length = n if whole_batches_of is None else n - n % whole_batches_of

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def order(self) -> np.ndarray:
        """This epoch's permutation of the labels (seeded by ``(seed, epoch)``)."""
        if self._order is None or self._order[0] != self.epoch:
            self._order = (self.epoch, np.random.default_rng([self.seed, self.epoch]).permutation(len(self.labels)))
        return self._order[1]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.length:
            raise IndexError(f"sample {i} out of range for an epoch of {self.length}")
        j = int(self.order()[i])
        rng = np.random.default_rng([self.seed, self.epoch, i])
        lab = self.labels[j]
        t = self.targets[lab.target]
        assert t.image is not None
        shape = t.image.shape[1:]
        start = [int(rng.integers(min(0, s - p), max(0, s - p) + 1)) for s, p in zip(shape, self.patch_size,
                                                                                    strict=True)]
        src = tuple(slice(max(a, 0), min(a + p, s)) for a, p, s in zip(start, self.patch_size, shape, strict=True))
        dst = tuple(slice(sl.start - a, sl.stop - a) for sl, a in zip(src, start, strict=True))
        image = np.zeros((t.image.shape[0], *self.patch_size), np.float32)
        image[(slice(None), *dst)] = t.image[(slice(None), *src)]
        label = np.zeros(self.patch_size, np.int64)
        label[dst] = lab.mask[src]
        return {"image": torch.from_numpy(image), "available": torch.from_numpy(t.available.astype(bool)),
                "label": torch.from_numpy(label), "label_id": torch.tensor(j)}


class _WholeTargets(Dataset):
    def __init__(self, targets: Sequence[TargetImage]) -> None:
        self.targets = list(targets)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> dict:
        t = self.targets[i]
        assert t.image is not None
        ref = np.zeros(t.image.shape[1:], np.int64) if t.reference is None else t.reference.astype(np.int64)
        return {"image": torch.from_numpy(t.image), "available": torch.from_numpy(t.available.astype(bool)),
                "reference": torch.from_numpy(ref), "has_reference": torch.tensor(t.reference is not None)}


class DeepStapleDataModule(L.LightningDataModule):
    """Candidate-label samples of the training targets; whole validation targets (scored against references).

    ``batch_size`` is the global batch; in multi-process training each rank takes its share of every batch of the
    epoch's label order (:class:`~medmodal.engine.distributed.RankShard`) and every ``W``-th validation target.
    ``drop_last`` leaves out each epoch's last, partial global batch (see :class:`CandidateLabelDataset`).
    """

    def __init__(self, *, label_set: LabelSet, train_ids: Sequence[str], val_ids: Sequence[str],
                 patch_size: Sequence[int], batch_size: int, num_workers: int = 0, seed: int = 0,
                 drop_last: bool = True) -> None:
        super().__init__()
        self.label_set, self.train_ids, self.val_ids = label_set, list(train_ids), list(val_ids)
        self.train_labels = [lab for lab in label_set.labels if lab.target in set(self.train_ids)]
        self.patch_size, self.batch_size, self.num_workers, self.seed = patch_size, batch_size, num_workers, seed
        self.drop_last = drop_last

    @property
    def batches_per_epoch(self) -> int:
        """Global batches (steps) in one epoch: one pass over the training labels."""
        n, b = len(self.train_labels), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    @property
    def _ranks(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        ds = CandidateLabelDataset(labels=self.train_labels, targets=self.label_set.targets,
                                   patch_size=self.patch_size, seed=self.seed,
                                   whole_batches_of=self.batch_size if self.drop_last else None)
        rank, world = self._ranks
        shard = RankShard(ds, rank=rank, world_size=world, batch_size=self.batch_size)
        return DataLoader(shard, batch_size=shard.local_batch, shuffle=False, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        ds = _WholeTargets([self.label_set.targets[t] for t in self.val_ids])
        rank, world = self._ranks
        return DataLoader(ValidationShard(ds, rank=rank, world_size=world), batch_size=1, shuffle=False,
                          num_workers=self.num_workers)


class DataParameterExport(L.Callback):
    """Write ``RUN/data_parameters.csv`` at the end of training: one row per training label
    (:data:`PARAMETER_COLUMNS`, with its θ and foreground voxels on the training grid), atomically."""

    def __init__(self, labels: Sequence[CandidateLabel]) -> None:
        self.labels = list(labels)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_rank != 0:
            return
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(PARAMETER_COLUMNS)
        for j, (lab, th) in enumerate(zip(self.labels, pl_module.theta.tolist(), strict=True)):  # type: ignore
            w.writerow([j, lab.target, lab.source, lab.path or "", f"{th:.6g}", int(np.count_nonzero(lab.mask)),
                        f"{lab.true_dice:.6f}" if np.isfinite(lab.true_dice) else "", lab.detail])
        atomic_write_text(Path(trainer.default_root_dir) / "data_parameters.csv", buf.getvalue())


def read_data_parameters(run_dir: Path) -> list[dict[str, str]]:
    """The rows of ``RUN/data_parameters.csv`` (strings), or :class:`RunError` if the run has none."""
    path = Path(run_dir) / "data_parameters.csv"
    if not path.is_file():
        raise RunError(f"{path}: not found; is {run_dir} a finished DeepSTAPLE run? (train it first)")
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def build_deepstaple(recipe: Recipe) -> Training:
    """System, data module and run description of a ``method.name: deepstaple`` recipe."""
    from medmodal.engine.cases import PREPROCESSING, build_network, network_kwargs
    from medmodal.methods.deepstaple.system import DeepStapleSystem

    m, t, d = recipe.method, recipe.train, recipe.data
    try:
        per_rank_batch(d.batch_size, recipe.world_size)
    except ValueError as err:
        raise RecipeError(str(err)) from None
    # train()'s periodic checkpoints hold the state after both steps of a batch, which is what resuming needs
    warnings.filterwarnings("ignore", message=".*ModelCheckpoint with manual optimization.*")
    label_set = load_label_set(recipe)
    train_ids, val_ids = split_cases(sorted(label_set.targets), val_fraction=d.val_fraction, seed=recipe.seed)
    data = DeepStapleDataModule(label_set=label_set, train_ids=train_ids, val_ids=val_ids, patch_size=d.patch_size,
                                batch_size=d.batch_size, num_workers=d.num_workers, seed=recipe.seed,
                                drop_last=m.drop_last)
    labels = data.train_labels
    if data.batches_per_epoch == 0:
        raise RecipeError(f"data.batch_size: {d.batch_size} is more than the {len(labels)} training labels, so "
                          "method.drop_last leaves no batch; lower data.batch_size or set method.drop_last: false")
    _warn_ignored_train_settings(recipe, data.batches_per_epoch)
    counts = {tid: sum(lab.target == tid for lab in labels) for tid in train_ids}
    single = sorted(tid for tid, c in counts.items() if c < 2)
    if single:
        log.warning("target(s) %s have one candidate label only: their consensus is that label", single[:5])
    kwargs = network_kwargs(recipe, label_set.modalities, out_channels=2)
    network = build_network(recipe.model.name, kwargs)
    fg = [int(np.count_nonzero(lab.mask)) for lab in labels]
    total = sum(int(lab.mask.size) for lab in labels)
    system = DeepStapleSystem(
        network=network, foreground_voxels=fg, class_voxels=[total - sum(fg), sum(fg)],
        true_dice=[lab.true_dice for lab in labels], dp_update=m.dp_update,
        risk_regularization=m.risk_regularization, fixed_weighting=m.fixed_weighting,
        dp_loss_class_weights=m.dp_loss_class_weights, dp_lr=m.dp_lr, class_weight_exponent=m.class_weight_exponent,
        ce_normalisation=m.ce_normalisation,
        optimizer=t.optimizer, lr=t.lr, weight_decay=t.weight_decay, momentum=t.momentum, schedule=t.schedule,
        max_steps=t.max_steps, lr_decay=m.lr_decay, lr_gamma=m.lr_gamma, lr_decay_every=m.lr_decay_every,
        roi_size=recipe.eval_roi_size, overlap=recipe.eval.overlap, sw_batch_size=recipe.eval.sw_batch_size,
    )
    log.info("DeepSTAPLE: %d training labels on %d targets, %d validation targets",
             len(labels), len(train_ids), len(val_ids))
    fg_values = m.candidates.foreground if m.candidates is not None else None
    task = TaskInfo(kind="labels", label_values=[0, 1], label_names={0: "background", 1: "foreground"})
    return Training(
        system=system, data=data, network_name=recipe.model.name, network_kwargs=kwargs, task=task,
        modalities=tuple(label_set.modalities),
        preprocessing={**PREPROCESSING, **resolve_source(d).preprocessing(),
                       "foreground": fg_values or "every non-zero label value"},
        inference={"roi_size": list(recipe.eval_roi_size), "overlap": recipe.eval.overlap, "blend": recipe.eval.blend,
                   "sw_batch_size": recipe.eval.sw_batch_size},
        callbacks=[DataParameterExport(labels)],
    )


def _warn_ignored_train_settings(recipe: Recipe, batches_per_epoch: int) -> None:
    """Warn (once per run) about ``train`` settings a DeepSTAPLE run does not follow.

    DeepSTAPLE validates once per epoch (one pass over the training labels), as the official code, and its
    epoch-based learning-rate decay needs that epoch; ``train.schedule`` only applies with
    ``method.lr_decay: schedule``. A value left at the ``train`` default (which every stored recipe carries)
    is not warned about.
    """
    t, m = recipe.train, recipe.method
    defaults = type(t).model_fields
    if t.val_every_steps not in (defaults["val_every_steps"].default, batches_per_epoch):
        log.warning("train.val_every_steps %d is ignored: DeepSTAPLE validates once per epoch (%d steps: one pass "
                    "over the training labels); remove it", t.val_every_steps, batches_per_epoch)
    if m.lr_decay != "schedule" and t.schedule != defaults["schedule"].default:
        log.warning("train.schedule %r is ignored: method.lr_decay is %r; set method.lr_decay: schedule to use it",
                    t.schedule, m.lr_decay)


def consensus_inputs(run_dir: Path) -> tuple[LabelSet, dict[str, tuple[np.ndarray, np.ndarray, list[dict]]]]:
    """Per training target: ``(masks (K, *S) bool on its own grid, θ (K,), the K data-parameter rows)``."""
    run_dir = Path(run_dir)
    rows = read_data_parameters(run_dir)
    recipe = load_recipe(run_dir / "recipe.yaml")
    label_set = load_label_set(recipe, training_grid=False)
    by_key = {(lab.target, lab.source): lab for lab in label_set.labels}
    grouped: dict[str, list[dict]] = {}
    for r in rows:
        if (r["target"], r["source"]) not in by_key:
            raise RunError(f"{run_dir}/data_parameters.csv: label {r['source']!r} of target {r['target']!r} is no "
                           "longer among the recipe's candidate labels; was the data changed after training?")
        grouped.setdefault(r["target"], []).append(r)
    out = {}
    for target, rs in grouped.items():
        out[target] = (np.stack([by_key[(target, r["source"])].mask for r in rs]),
                       np.array([float(r["theta"]) for r in rs]), rs)
    return label_set, out


def write_dp_consensus(run_dir: Path, out_dir: Path, *, overwrite: bool) -> list[Path]:
    """Write the data-parameter consensus of every training target of ``run_dir`` into ``out_dir``.

    ``C_t = 1[Σ_k softmax_k(θ_t) y_{t,k} > 0.5]`` over the raw θ of the target's own labels (DeepSTAPLE §2.4):
    ``out_dir/<target>.nii.gz`` (uint8 0/1, on the target's own grid and affine) and ``out_dir/consensus.csv``
    (target, n_labels, foreground_voxels, dice_to_reference when the reference is known). Refuses a non-empty
    ``out_dir`` unless ``overwrite``; nothing is left behind on failure. Returns the consensus label files.
    """
    from medmodal.data.io import staged_output_dir, write_image
    from medmodal.evaluation.metrics import binary_dice
    from medmodal.fusion.vote import dp_consensus

    label_set, inputs = consensus_inputs(run_dir)
    out_dir = Path(out_dir)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["target", "n_labels", "foreground_voxels", "dice_to_reference"])
    with staged_output_dir(out_dir, overwrite=overwrite) as stage:
        for target, (masks, theta, _) in sorted(inputs.items()):
            t = label_set.targets[target]
            fused = np.asarray(dp_consensus(torch.from_numpy(masks), torch.from_numpy(theta)), dtype=bool)
            write_image(Volume(fused.astype(np.uint8), t.affine), stage / f"{target}.nii.gz")
            ref = "" if t.reference is None else f"{binary_dice(fused, t.reference):.6f}"
            w.writerow([target, len(theta), int(fused.sum()), ref])
        (stage / "consensus.csv").write_text(buf.getvalue(), encoding="utf-8")
    return [out_dir / f"{target}.nii.gz" for target in sorted(inputs)]

