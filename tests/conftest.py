"""Shared test settings: 2 threads, deterministic, no GPU, a private cache folder per session."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import torch

from medmodal.engine.recipe import Recipe, recipe_from_dict

torch.set_num_threads(2)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep generated phantoms and preprocessed caches out of the user's ~/.cache."""
    os.environ["MEDMODAL_CACHE"] = str(tmp_path_factory.mktemp("medmodal_cache"))


def _tiny_recipe_dict(dims: int = 3, **train: Any) -> dict[str, Any]:
    """A recipe that trains in seconds: 6 phantom cases of 20 voxels per axis, a 2-stage U-Net."""
    return {
        "name": f"tiny{dims}d",
        "data": {
            "phantom": {"cases": 6, "spatial_dims": dims, "size": 20 if dims == 3 else 33, "seed": 1},
            "patch_size": [16] * 3 if dims == 3 else [24, 24],
            "batch_size": 2,
            "val_fraction": 0.34,
            "num_workers": 0,
        },
        "model": {"name": "unet", "kwargs": {"channels": [4, 8]}},
        "train": {"max_steps": 6, "val_every_steps": 3, "checkpoint_every_steps": 2, "progress": False, **train},
        "eval": {"overlap": 0.0, "sw_batch_size": 1},
    }


@pytest.fixture
def tiny_recipe_dict() -> Callable[..., dict[str, Any]]:
    """Factory of tiny recipe dicts: ``tiny_recipe_dict(dims=2, max_steps=4)``."""
    return _tiny_recipe_dict


@pytest.fixture
def tiny_recipe() -> Recipe:
    return recipe_from_dict(_tiny_recipe_dict())
