"""`train` prints medmodal's messages, not Lightning's device banner and notices (issue 11, item 9); they stay
in the run's log.txt. ITK's C++ warnings are off."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import SimpleITK as sitk

from medmodal.engine.recipe import recipe_from_dict
from medmodal.engine.train import train

NOISE = ("GPU available", "TPU available", "weights_only", "`Trainer.fit` stopped")


class _Stderr(logging.StreamHandler):
    """A StreamHandler on whatever ``sys.stderr`` is when it writes (pytest swaps it between phases)."""

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # noqa: ANN001
        pass


@pytest.fixture
def lightning_console() -> Iterator[None]:
    """Lightning's console handler as a terminal session has it: importing Lightning with no root handler adds a
    stderr StreamHandler to ``lightning.pytorch`` and ``lightning.fabric`` and stops propagation (under pytest the
    root logger has handlers, so Lightning added none)."""
    saved = []
    for name in ("lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        handler = _Stderr()
        saved.append((logger, handler, logger.propagate))
        logger.addHandler(handler)
        logger.propagate = False
    yield
    for logger, handler, propagate in saved:
        logger.removeHandler(handler)
        logger.propagate = propagate


def test_train_prints_no_third_party_noise(tmp_path: Path, capfd, tiny_recipe_dict, lightning_console) -> None:
    recipe = recipe_from_dict(tiny_recipe_dict(dims=2, max_steps=2, val_every_steps=2))
    run = train(recipe, tmp_path / "run")
    train(None, run, resume=True, overrides={"train.max_steps": 3})  # loading a checkpoint: the weights_only notice
    out, err = capfd.readouterr()
    for noise in NOISE:
        assert noise not in out + err, (noise, err)
    log = (run / "log.txt").read_text()
    assert "GPU available" in log  # kept where it is useful: the run's own log


def test_itk_warnings_are_off_after_quiet_third_party() -> None:
    from medmodal.engine.run import quiet_third_party

    sitk.ProcessObject.SetGlobalWarningDisplay(True)
    quiet_third_party()
    assert not sitk.ProcessObject.GetGlobalWarningDisplay()
