"""Progress of one registration from its optimiser's iterations (SimpleITK's ``sitkIterationEvent``).

A registration reports ``callback(stage, done, total)``: ``stage`` is ``"affine"``, ``"bspline"`` or
``"demons"``, ``done`` counts the iteration events of that stage over all pyramid levels and ``total`` is its
upper bound (iterations per level × levels; for L-BFGS-B, which reports each line-search step, its function
evaluations; an optimiser that converges early ends below it). :class:`Throttle` passes on few enough of them
to cross a process boundary.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import SimpleITK as sitk

__all__ = ["IterationCallback", "Throttle", "add_iteration_command"]

#: ``callback(stage, done, total)``
IterationCallback = Callable[[str, int, int], None]


def add_iteration_command(process: sitk.ProcessObject | sitk.ImageRegistrationMethod,
                          callback: IterationCallback, *, stage: str, total: int) -> None:
    """Call ``callback(stage, done, total)`` on every iteration event of ``process`` (``done`` from 1)."""
    done = [0]

    def on_iteration() -> None:
        done[0] += 1
        callback(stage, done[0], total)

    process.AddCommand(sitk.sitkIterationEvent, on_iteration)


class Throttle:
    """Forward the first event of each stage, the last one, and otherwise at most one every ``interval_s``.

    Args:
        callback: what receives the forwarded events.
        interval_s: the shortest time between two forwarded events of one stage.
    """

    def __init__(self, callback: IterationCallback, *, interval_s: float = 0.5) -> None:
        self.callback, self.interval_s = callback, interval_s
        self._stage: str | None = None
        self._last = 0.0

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        if stage != self._stage or done >= total or now - self._last >= self.interval_s:
            self._stage, self._last = stage, now
            self.callback(stage, done, total)
