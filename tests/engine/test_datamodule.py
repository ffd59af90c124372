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


def _phantom_in_process(cache: str, queue) -> None:  # noqa: ANN001 - a multiprocessing queue
    import os

    os.environ["MEDMODAL_CACHE"] = cache
    import time

    import nibabel as nib

    from medmodal.data.formats import open_dataset
    from medmodal.engine.datamodule import ensure_phantom
    from medmodal.engine.recipe import PhantomConfig

    root = ensure_phantom(PhantomConfig(cases=8, spatial_dims=3, size=24, seed=3))
    ok, ids, until = True, [], time.monotonic() + 4.0
    while time.monotonic() < until:  # keep reading while the other processes finish theirs
        try:
            info, records = open_dataset(root)
            ids = sorted(r.case_id for r in records)
            for r in records:
                for path in r.images.values():
                    nib.load(path).get_fdata()
        except Exception:  # noqa: BLE001 - any failure to read is the bug under test
            ok = False
            break
    queue.put((str(root), ids, ok))


def test_processes_generating_the_same_phantom_at_once_all_read_a_complete_one(tmp_path) -> None:
    """Two processes that need the same phantom at once (two `train` commands) both get all of it: each writes a
    private copy and renames it into place, the first rename wins."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_phantom_in_process, args=(str(tmp_path / "cache"), queue)) for _ in range(3)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert len({r[0] for r in results}) == 1
    assert all(r[1] == [f"phantom_{i:03d}" for i in range(8)] and r[2] for r in results), results
    leftovers = [p.name for p in (tmp_path / "cache" / "phantom").iterdir() if p.name.endswith(".tmp")]
    assert not leftovers


def test_label_subsets_are_seeded_nested_and_never_empty() -> None:
    from medmodal.engine.datamodule import label_subset

    ids = [f"c{i:03d}" for i in range(40)]
    subsets = {f: label_subset(ids, fraction=f, seed=3) for f in (0.1, 0.25, 0.5, 1.0)}
    assert [len(s) for s in subsets.values()] == [4, 10, 20, 40]
    assert set(subsets[0.1]) < set(subsets[0.25]) < set(subsets[0.5]) < set(subsets[1.0])  # nested
    assert label_subset(list(reversed(ids)), fraction=0.25, seed=3) == subsets[0.25]  # input order is irrelevant
    assert label_subset(ids, fraction=0.25, seed=4) != subsets[0.25]  # the seed draws another subset
    assert label_subset(ids[:3], fraction=0.01, seed=0) and len(label_subset(ids[:3], fraction=0.01, seed=0)) == 1
    with pytest.raises(ValueError, match="label_fraction"):
        label_subset(ids, fraction=0.0, seed=0)


def test_a_method_that_does_not_subsample_labels_refuses_label_fraction() -> None:
    from pydantic import ValidationError

    from medmodal.engine.plugin import get_method
    from medmodal.engine.recipe import Recipe

    ok = get_method("zero_fill").contract_recipe(2)
    ok["data"]["label_fraction"] = 0.5
    assert Recipe.model_validate(ok).data.label_fraction == 0.5
    other = get_method("pumit").contract_recipe(3)
    other["data"]["label_fraction"] = 0.5
    with pytest.raises(ValidationError, match="data.label_fraction: method 'pumit'"):
        Recipe.model_validate(other)
