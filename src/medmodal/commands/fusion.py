"""``medmodal fuse``: majority vote, STAPLE and data-parameter consensus of candidate labels."""

from __future__ import annotations

import typer


def add_commands(app: typer.Typer) -> None:
    """Register this module's commands on ``app`` (placeholder until the command lands)."""
