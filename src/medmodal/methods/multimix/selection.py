"""Model selection of a MultiMix run (spec §2.5 ``model_selection``): which weights ``evaluate`` and ``predict``
use. The released code saved the weights of epoch 0 only (its validation computed no loss, so the first save
stuck); medmodal keeps the best validation score by default."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning as L
from torch import nn

from medmodal.atomic import atomic_write_text

#: the folder of a run holding the selected weights (``model.safetensors`` + ``model.json`` + ``selected.json``).
SELECTED = "selected"


class SelectedWeights(L.Callback):
    """Write ``RUN/selected/`` after a validation whose ``val/score`` the rule picks: ``validation`` (the best so
    far), ``first`` (the first validation's weights, the released code's behaviour); ``last`` writes nothing
    (``weights/`` holds the last weights). The best score and its step live in the checkpoint, so a resumed run
    keeps selecting against the same best."""

    def __init__(self, *, rule: str, name: str, kwargs: dict[str, Any]) -> None:
        self.rule, self.name, self.kwargs = rule, name, dict(kwargs)
        self.best = -math.inf
        self.step: int | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.rule == "last":
            return
        score = trainer.callback_metrics.get("val/score")
        if score is None:
            return
        score = float(score)
        better = self.step is None if self.rule == "first" else score > self.best
        if not better:
            return
        self.best, self.step = score, int(trainer.global_step)
        if trainer.global_rank == 0:
            from medmodal.engine.run import save_weights

            folder = Path(trainer.default_root_dir) / SELECTED
            save_weights(pl_module.network, folder, name=self.name, kwargs=self.kwargs)
            atomic_write_text(folder / "selected.json", json.dumps(
                {"rule": self.rule, "step": self.step, "val_score": score}, indent=2))

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "step": self.step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best, self.step = float(state_dict["best"]), state_dict["step"]


def selected_network(run_dir: Path, rule: str) -> tuple[nn.Module, str]:
    """The network ``evaluate``/``predict`` use and a description (``"step 200 (best validation score 1.71)"``)."""
    from medmodal.engine.run import load_network

    folder = Path(run_dir) / SELECTED
    if rule != "last" and (folder / "model.safetensors").is_file():
        doc = json.loads((folder / "selected.json").read_text(encoding="utf-8"))
        what = "best validation score" if rule == "validation" else "first validation"
        return load_network(folder), f"step {doc['step']} ({what}, val score {doc['val_score']:.3f})"
    return load_network(Path(run_dir) / "weights"), "the last step"
