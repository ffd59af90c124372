"""``medmodal evaluate`` on a MedCoSS run: a linear probe of the encoder on every stage it has seen.

For each stage so far whose data has a class per case (the phantom's tumour grade, a manifest's ``target``), the
frozen encoder's pooled features of the stage's training items fit a logistic regression (scikit-learn, on
standardised features) that is scored on the held-out items: accuracy and balanced accuracy. Evaluated after every
stage, these rows form the stage x task matrix of the continual-learning experiment (forgetting = the drop from the
best earlier value).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from medmodal.atomic import atomic_write_text, write_csv
from medmodal.engine.runinfo import LoadedRun

log = logging.getLogger("medmodal")


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, *,
                 seed: int = 0) -> dict[str, float]:
    """Accuracy and balanced accuracy of a logistic regression fitted on ``train_x (N, W)`` and scored on
    ``val_x``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    probe.fit(train_x, train_y)
    pred = probe.predict(val_x)
    return {"accuracy": float(np.mean(pred == val_y)), "balanced_accuracy": float(balanced_accuracy_score(val_y, pred))}


def probe_rows(run: LoadedRun, *, progress: bool = False) -> list[dict[str, Any]]:
    """One row per stage the run has seen: its probe scores (empty scores where the stage has no classes)."""
    from medmodal.data.text import load_text_tokenizer
    from medmodal.methods.medcoss.plugin import TOKENIZER_FILE, encoder_features
    from medmodal.methods.medcoss.sources import stage_items

    m = run.recipe.method
    seen = run.info.inference["stages"]
    tokenizer = load_text_tokenizer(run.dir / TOKENIZER_FILE) if (run.dir / TOKENIZER_FILE).is_file() else None
    network = run.network()
    rows = []
    for stage in [s for s in m.stages if s.name in seen]:
        train, val = stage_items(stage, tokenizer=tokenizer, method=m, seed=run.recipe.seed, progress=progress)
        row: dict[str, Any] = {"stage": stage.name, "kind": stage.kind, "train_items": len(train),
                               "held_out_items": len(val)}
        ok_train, ok_val = train.targets >= 0, val.targets >= 0
        if len(set(train.targets[ok_train].tolist())) < 2 or not ok_val.any():
            log.info("stage %s: no classes to probe", stage.name)
            rows.append({**row, "accuracy": "", "balanced_accuracy": ""})
            continue
        fx = encoder_features(network, train, kind=stage.kind, pooling=m.text_pooling)
        vx = encoder_features(network, val, kind=stage.kind, pooling=m.text_pooling)
        scores = linear_probe(fx[ok_train], train.targets[ok_train], vx[ok_val], val.targets[ok_val],
                              seed=run.recipe.seed)
        rows.append({**row, **{k: round(v, 4) for k, v in scores.items()}})
    return rows


def evaluate_run(run: LoadedRun, *, out_dir: Path, progress: bool, model_name: str | None = None) -> Path:
    """Probe ``run`` on every stage it has seen; writes ``probes.csv`` and ``report.md``."""
    rows = probe_rows(run, progress=progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    header = ["stage", "kind", "train_items", "held_out_items", "accuracy", "balanced_accuracy"]
    write_csv(out_dir / "probes.csv", header, [[r[k] for k in header] for r in rows])
    inf = run.info.inference
    lines = [f"# MedCoSS linear probes: {model_name or run.dir.name}", "",
             "**Data: synthetic phantom** where a stage reads the phantom (procedurally generated, not patients).", "",
             f"- run: `{run.dir}`; stages trained: {', '.join(inf['stages'])} (strategy {inf['strategy']}); "
             f"buffers: {', '.join(inf.get('buffers', [])) or 'none'}", "",
             "| stage | kind | train items | held-out items | accuracy | balanced accuracy |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        acc = "-" if r["accuracy"] == "" else f"{r['accuracy']:.3f}"
        bal = "-" if r["balanced_accuracy"] == "" else f"{r['balanced_accuracy']:.3f}"
        lines.append(f"| {r['stage']} | {r['kind']} | {r['train_items']} | {r['held_out_items']} | {acc} | {bal} |")
    lines += ["", "A logistic regression on the frozen encoder's pooled features (images: the mean of all output "
              "tokens, cls included; texts: the mean of the real tokens) of each stage's training items, scored on "
              "its held-out items (the same split as training); '-' where a stage has no classes.", ""]
    atomic_write_text(out_dir / "report.md", "\n".join(lines))
    return out_dir / "report.md"
