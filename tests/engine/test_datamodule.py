from __future__ import annotations

import numpy as np
import pytest

from medmodal.data.case import DataError
from medmodal.data.phantom import write_phantom
from medmodal.engine.datamodule import prepare_cache, resolve_source, split_cases
from medmodal.engine.recipe import DataConfig


def test_nnunet_layout_labels_come_back_as_brats_values(tmp_path) -> None:
    """nnU-Net stores BraTS 1/2/4 as 1/2/3; the cache must hold the original values (and so ET = 4)."""
    root = write_phantom(tmp_path / "nn", cases=3, seed=2, size=20, layout="nnunet")
    source = resolve_source(DataConfig(path=root, patch_size=[16, 16, 16], cache_dir=tmp_path / "cache"))
    assert source.modalities == ("t1", "t1c", "t2", "flair")
    index = prepare_cache(source)
    values = set()
    for case in index.cases:
        values |= set(np.unique(case.label()).tolist())
    assert values <= {0, 1, 2, 4} and 4 in values
    assert index.info.regions["ET"] == (4,)


def test_modality_subset_and_unknown_names(tmp_path) -> None:
    root = write_phantom(tmp_path / "b", cases=2, seed=2, size=20)
    source = resolve_source(DataConfig(path=root, modalities=["flair", "t1c"], patch_size=[16, 16, 16],
                                       cache_dir=tmp_path / "cache"))
    assert source.modalities == ("flair", "t1c")
    index = prepare_cache(source)  # the other two modalities are left out, not an error
    assert index.cases[0].image().shape[0] == 2 and index.cases[0].available.tolist() == [True, True]
    with pytest.raises(DataError, match="data.modalities.*'pd'"):
        resolve_source(DataConfig(path=root, modalities=["pd"], patch_size=[16, 16, 16]))
    with pytest.raises(DataError, match="does not exist"):
        resolve_source(DataConfig(path=tmp_path / "nope", patch_size=[16, 16, 16]))


def test_split_is_deterministic_disjoint_and_never_empty() -> None:
    ids = [f"c{i}" for i in range(10)]
    train, val = split_cases(ids, val_fraction=0.2, seed=0)
    assert (train, val) == split_cases(list(reversed(ids)), val_fraction=0.2, seed=0)
    assert len(val) == 2 and sorted(train + val) == sorted(ids)
    assert split_cases(["a", "b"], val_fraction=0.9, seed=0)[0]  # at least one training case
    with pytest.raises(DataError, match="at least 2 labelled cases"):
        split_cases(["a"], val_fraction=0.2, seed=0)
