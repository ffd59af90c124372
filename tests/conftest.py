"""Shared test settings: 2 threads, deterministic, no GPU, a private cache folder per session."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep generated phantoms and preprocessed caches out of the user's ~/.cache."""
    os.environ["MEDMODAL_CACHE"] = str(tmp_path_factory.mktemp("medmodal_cache"))
