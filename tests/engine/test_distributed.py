"""medmodal.engine.distributed: ranks from the environment, rank shards, validation shards, exact means."""

from __future__ import annotations

import math

import pytest
import torch

from medmodal.engine.distributed import MeanAccumulator, RankShard, ValidationShard, global_rank, per_rank_batch


def _indices(n: int, *, world: int, batch: int) -> list[list[int]]:
    return [[RankShard(list(range(n)), rank=r, world_size=world, batch_size=batch).global_index(i)
             for i in range(len(RankShard(list(range(n)), rank=r, world_size=world, batch_size=batch)))]
            for r in range(world)]


@pytest.mark.parametrize(("n", "world", "batch"), [(12, 2, 4), (12, 3, 6), (8, 4, 4), (6, 1, 2)])
def test_rank_shard_covers_every_index_once_for_divisible_lengths(n: int, world: int, batch: int) -> None:
    per_rank = _indices(n, world=world, batch=batch)
    assert [len(p) for p in per_rank] == [n // world] * world
    assert sorted(i for p in per_rank for i in p) == list(range(n))
    # step j of rank r is items j*B + r*b ... of the global order: the ranks' batches form the global batch
    b = batch // world
    for j in range(n // batch):
        glob = [i for p in per_rank for i in p[j * b:(j + 1) * b]]
        assert glob == list(range(j * batch, (j + 1) * batch))


def test_rank_shard_two_ranks_by_hand() -> None:
    assert _indices(8, world=2, batch=4) == [[0, 1, 4, 5], [2, 3, 6, 7]]


def test_rank_shard_pads_only_the_last_partial_batch() -> None:
    # 7 items, global batch 4 on 2 ranks: batch 0 = 0..3; batch 1 = 4, 5, 6 + one repeat of the epoch's item 0
    per_rank = _indices(7, world=2, batch=4)
    assert per_rank == [[0, 1, 4, 5], [2, 3, 6, 0]]
    assert len(per_rank[0]) == len(per_rank[1])
    # 9 items, batch 6 on 3 ranks: last batch 6, 7, 8 split one per rank, no padding needed
    assert _indices(9, world=3, batch=6) == [[0, 1, 6], [2, 3, 7], [4, 5, 8]]
    # 10 items, batch 4 on 4 ranks: the last 2 items padded with items 0 and 1
    assert _indices(10, world=4, batch=4) == [[0, 4, 8], [1, 5, 9], [2, 6, 0], [3, 7, 1]]


def test_rank_shard_getitem_and_errors() -> None:
    data = [f"x{i}" for i in range(8)]
    shard = RankShard(data, rank=1, world_size=2, batch_size=4)
    assert [shard[i] for i in range(len(shard))] == ["x2", "x3", "x6", "x7"]
    with pytest.raises(IndexError):
        shard.global_index(4)
    with pytest.raises(ValueError, match="rank 2"):
        RankShard(data, rank=2, world_size=2, batch_size=4)
    with pytest.raises(ValueError, match="data.batch_size = 3"):
        RankShard(data, rank=0, world_size=2, batch_size=3)
    assert per_rank_batch(8, 4) == 2
    with pytest.raises(ValueError, match="world size"):
        per_rank_batch(8, 0)


def test_rank_shard_passes_the_epoch_on() -> None:
    class Epochs(list):
        epoch = -1

        def set_epoch(self, e: int) -> None:
            self.epoch = e

    data = Epochs(range(4))
    RankShard(data, rank=0, world_size=2, batch_size=2).set_epoch(5)
    assert data.epoch == 5


def test_validation_shard_weights() -> None:
    cases = [{"id": i} for i in range(5)]
    shards = [ValidationShard(cases, rank=r, world_size=2) for r in range(2)]
    assert [len(s) for s in shards] == [3, 3]
    items = [[s[i] for i in range(len(s))] for s in shards]
    assert [(x["id"], x["weight"]) for x in items[0]] == [(0, 1.0), (2, 1.0), (4, 1.0)]
    assert [(x["id"], x["weight"]) for x in items[1]] == [(1, 1.0), (3, 1.0), (0, 0.0)]  # padding: weight 0
    # every case exactly once with weight 1 over all ranks
    real = sorted(x["id"] for it in items for x in it if x["weight"] == 1.0)
    assert real == list(range(5))
    assert "weight" not in cases[0]  # the items are copies
    # more ranks than cases: ranks without a case still run one weight-0 step
    three = [ValidationShard(cases[:2], rank=r, world_size=3) for r in range(3)]
    assert [len(s) for s in three] == [1, 1, 1] and three[2][0]["weight"] == 0.0
    assert len(ValidationShard([], rank=0, world_size=2)) == 0


def test_mean_accumulator_hand_computed() -> None:
    acc = MeanAccumulator()
    acc.add("d", 0.5)
    acc.add("d", torch.tensor([0.2, 0.8]), torch.tensor([1.0, 3.0]))
    acc.add("d", 0.9, 0.0)  # padding: not counted
    acc.add("e", torch.tensor([float("nan"), 1.0, float("inf")]))  # NaN / inf skipped
    acc.declare(["d", "e", "never"])
    out = acc.reduce()
    assert out["d"] == pytest.approx((0.5 + 0.2 + 3 * 0.8) / 5)  # 0.62
    assert out["e"] == 1.0
    assert math.isnan(out["never"])  # zero count
    assert acc.sums == {} and acc.counts == {}  # reduce starts over


def test_mean_accumulator_reduces_through_the_strategy_as_sums() -> None:
    class TwoRanks:
        world_size = 2

        def reduce(self, t: torch.Tensor, reduce_op: str) -> torch.Tensor:
            assert reduce_op == "sum"
            other = torch.tensor([[3.0, 0.0], [2.0, 0.0]], dtype=torch.float64)  # the other rank: d = 1.0, 2.0
            return t + other

    acc = MeanAccumulator()
    acc.add("d", 0.25)
    acc.declare(["d", "e"])
    out = acc.reduce(TwoRanks())
    assert out["d"] == pytest.approx((0.25 + 3.0) / 3)  # exact mean over 3 cases, not the mean of rank means
    assert math.isnan(out["e"])


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for var in ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK",
                "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_global_rank_from_the_environment(clean_env: pytest.MonkeyPatch) -> None:
    assert not torch.distributed.is_initialized()
    assert global_rank() == 0
    clean_env.setenv("LOCAL_RANK", "1")
    assert global_rank() == 1
    clean_env.setenv("NODE_RANK", "2")
    clean_env.setenv("LOCAL_WORLD_SIZE", "4")
    assert global_rank() == 9  # node 2 × 4 per node + local 1
    clean_env.setenv("SLURM_PROCID", "5")
    assert global_rank() == 5  # SLURM's global id wins over local + node
    clean_env.setenv("RANK", "3")
    assert global_rank() == 3  # torchrun's RANK wins over everything
