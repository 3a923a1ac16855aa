"""PlanBatchSampler over a real mined plan: order, coverage, resume, rank slices, loaders."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from trainers import (
    HardNegativeCollator,
    LocalPlan,
    PlanBatchSampler,
    PlanDatasetMismatch,
    PlanExhausted,
    PlanStateMismatch,
    rank_slice,
    split_hard_negatives,
)

N_ROWS = 2000  # conftest's corpus
ID_OFFSET = 1000


class RowDataset(Dataset):
    """Item i -> (i, 10_000 + i): a query and a target that name their dataset row."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[int, int]:
        return i, 10_000 + i


@pytest.fixture(scope="module")
def plan(small_plan) -> LocalPlan:
    return LocalPlan(small_plan)


def test_yields_every_example_once_per_epoch_in_plan_order(plan, small_plan):
    sampler = PlanBatchSampler(plan, dataset=RowDataset(N_ROWS))
    assert sampler.batch_size == plan.batch_size and len(sampler) == plan.batches_per_epoch
    for epoch in range(plan.epochs):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert np.array_equal(np.array(batches), small_plan.batch_rows(epoch))
        table = plan.epoch_table(epoch)
        real = np.array(batches).reshape(-1)[~table.column("padded").to_numpy(
            zero_copy_only=False)]
        assert len(set(real.tolist())) == len(real) == small_plan.manifest.counts.examples_per_epoch[
            epoch]
    assert list(PlanBatchSampler(plan).__iter__()) != batches  # epochs differ


def test_ids_mapping_follows_the_dataset_order(plan, small_plan):
    rng = np.random.default_rng(0)
    perm = rng.permutation(N_ROWS)  # dataset row j holds plan row perm[j]
    ids = perm + ID_OFFSET
    sampler = PlanBatchSampler(plan, ids=ids.tolist(), dataset=RowDataset(N_ROWS))
    got = np.array(list(sampler))
    assert np.array_equal(perm[got], small_plan.batch_rows(0))
    # String ids work the same way; a dict-of-lists dataset serves its own id column.
    str_ids = [f"doc-{i}" for i in ids]
    by_col = PlanBatchSampler(plan, dataset={"id": [int(i) for i in ids]}, id_column="id")
    assert np.array_equal(np.array(list(by_col)), got)
    with pytest.raises(PlanDatasetMismatch, match="integer ids but the dataset's ids"):
        PlanBatchSampler(plan, ids=str_ids)


def test_mismatch_errors_name_the_problem(plan):
    with pytest.raises(PlanDatasetMismatch, match="mined from 2000 rows but the dataset has 1999"):
        PlanBatchSampler(plan, dataset=RowDataset(N_ROWS - 1))
    ids = np.arange(N_ROWS) + ID_OFFSET
    ids[5] = -1  # plan id 1005 now missing from the dataset
    with pytest.raises(PlanDatasetMismatch, match=r"1 id\(s\) of the plan are not in the "
                                                  r"dataset, e.g. 1005"):
        PlanBatchSampler(plan, ids=ids)
    with pytest.raises(PlanDatasetMismatch, match="not unique"):
        PlanBatchSampler(plan, ids=np.r_[ids[:-1], ids[0]])
    with pytest.raises(PlanDatasetMismatch, match="ids given for a dataset of 10 rows"):
        PlanBatchSampler(plan, ids=ids, dataset=RowDataset(10))


def test_epoch_exhausted_and_cycle(plan):
    sampler = PlanBatchSampler(plan)
    with pytest.raises(PlanExhausted, match=r"has 2 epoch\(s\).*epoch 2 was requested"):
        sampler.set_epoch(plan.epochs)
    cyc = PlanBatchSampler(plan, on_exhausted="cycle")
    cyc.set_epoch(plan.epochs + 1)
    sampler.set_epoch(1)
    assert list(cyc) == list(sampler)


@pytest.mark.parametrize("cut", [0, 1, 7, 15])
def test_resume_from_state_dict_continues_exactly(plan, cut):
    full = PlanBatchSampler(plan)
    full.set_epoch(1)
    expected = list(full)

    first = PlanBatchSampler(plan)
    first.set_epoch(1)
    it = iter(first)
    seen = [next(it) for _ in range(cut)]
    state = first.state_dict()
    assert state == {"plan_id": plan.plan_id, "epoch": 1, "batches_yielded": cut, "rank": 0,
                     "world_size": 1}

    resumed = PlanBatchSampler(plan)  # a new process after a crash
    resumed.load_state_dict(state)
    resumed.set_epoch(1)  # the epoch loop calls this again: it must keep the resume point
    assert len(resumed) == len(expected) - cut
    assert seen + list(resumed) == expected
    assert len(resumed) == len(expected)  # the next iteration is a whole epoch again


def test_resume_refuses_a_state_from_another_plan(plan):
    sampler = PlanBatchSampler(plan)
    state = sampler.state_dict() | {"plan_id": "someotherplan"}
    with pytest.raises(PlanStateMismatch, match="different plan"):
        sampler.load_state_dict(state)


def test_resume_on_another_rank(plan):
    saved = PlanBatchSampler(plan, rank=0, world_size=2)
    it = iter(saved)
    next(it), next(it)
    other = PlanBatchSampler(plan, rank=1, world_size=2)
    other.load_state_dict(saved.state_dict())
    full = list(PlanBatchSampler(plan, rank=1, world_size=2))
    assert list(other) == full[2:]


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_rank_slices_union_to_the_global_batch(plan, small_plan, world_size):
    per_rank = [list(PlanBatchSampler(plan, rank=r, world_size=world_size))
                for r in range(world_size)]
    global_batches = small_plan.batch_rows(0)
    for k, batch in enumerate(global_batches):
        slices = [per_rank[r][k] for r in range(world_size)]
        assert all(len(s) == plan.batch_size // world_size for s in slices)
        assert sum(slices, []) == batch.tolist()
        sl = rank_slice(plan.batch_size, 1 % world_size, world_size)
        assert slices[1 % world_size] == batch[sl].tolist()
    # interleaved: the same slices, all of them, in rank order
    inter = list(PlanBatchSampler(plan, rank=0, world_size=world_size, layout="interleaved"))
    assert inter == [per_rank[r][k] for k in range(len(global_batches))
                     for r in range(world_size)]


def test_rank_slice_is_the_shared_rule(plan):
    from b3mine import sharding

    for b, w in [(128, 1), (128, 2), (128, 4), (96, 3)]:
        for r in range(w):
            assert rank_slice(b, r, w) == sharding.rank_slice(b, r, w)
    with pytest.raises(ValueError, match="not divisible.*multiple of the number of processes"):
        rank_slice(128, 0, 3)
    with pytest.raises(ValueError, match="batch_size 128 is not divisible by world_size 3"):
        PlanBatchSampler(plan, rank=0, world_size=3)


def test_interleaved_under_accelerate_sharding_gives_each_process_its_slice(plan, small_plan):
    """accelerate's own BatchSamplerShard deals our interleaved slices to the right ranks."""
    accelerate_data = pytest.importorskip("accelerate.data_loader")
    world_size = 4
    for r in range(world_size):
        sampler = PlanBatchSampler(plan, rank=0, world_size=world_size, layout="interleaved")
        shard = accelerate_data.BatchSamplerShard(sampler, num_processes=world_size,
                                                  process_index=r, split_batches=False,
                                                  even_batches=False)
        got = list(shard)
        assert len(got) == len(shard) == plan.batches_per_epoch
        assert got == [b[rank_slice(plan.batch_size, r, world_size)].tolist()
                       for b in small_plan.batch_rows(0)]
    # split_batches=True: the sampler yields whole batches and accelerate cuts them itself.
    whole = PlanBatchSampler(plan, rank=0, world_size=1)
    shard = accelerate_data.BatchSamplerShard(whole, num_processes=2, process_index=1,
                                              split_batches=True)
    assert list(shard)[0] == small_plan.batch_rows(0)[0][64:].tolist()


def test_dataloader_with_two_workers(plan, small_plan):
    sampler = PlanBatchSampler(plan, dataset=RowDataset(N_ROWS))
    loader = DataLoader(RowDataset(N_ROWS), batch_sampler=sampler, num_workers=2)
    sampler.set_epoch(1)
    got = [q.tolist() for q, _ in loader]
    assert got == small_plan.batch_rows(1).tolist()
    assert len(loader) == plan.batches_per_epoch


def test_hard_negatives_collate_layout(plan, small_plan):
    sampler = PlanBatchSampler(plan, negatives=True, rank=1, world_size=2)
    assert sampler.batch_size is None  # lengths vary: accelerate must not drop batches
    collate = HardNegativeCollator.for_sampler(sampler)
    loader = DataLoader(RowDataset(N_ROWS), batch_sampler=sampler, collate_fn=collate)
    negatives = small_plan.negatives_for(np.arange(N_ROWS))
    for k, (indices, batch) in enumerate(zip(sampler, loader)):
        global_batch = small_plan.batch_rows(0)[k]
        local = global_batch[64:128]
        split = split_hard_negatives(indices, sampler.local_batch_size)
        assert split.query_rows.tolist() == local.tolist()
        assert split.target_rows[:64].tolist() == local.tolist()
        negs = split.target_rows[64:].tolist()
        expected = [n for r in local for n in negatives[r] if n >= 0]
        assert set(negs) == set(expected) - set(global_batch.tolist())
        assert len(negs) == len(set(negs)) and split.n_negatives == len(negs) > 0
        assert torch.equal(batch["queries"], torch.tensor(local.tolist()))
        assert torch.equal(batch["targets"], torch.as_tensor(split.target_rows) + 10_000)
        assert torch.equal(batch["labels"], torch.arange(64))
        if k == 2:
            break


def test_negatives_by_id(plan, small_plan):
    perm = np.random.default_rng(1).permutation(N_ROWS)
    by_id = PlanBatchSampler(plan, ids=perm + ID_OFFSET, negatives=True)
    by_row = PlanBatchSampler(plan, negatives=True)
    first_id, first_row = next(iter(by_id)), next(iter(by_row))
    assert perm[first_id].tolist() == first_row
    assert by_id.unknown_negatives == 0


def test_negatives_need_a_plan_with_negatives(tmp_path, corpus_path):
    from b3mine.config import MiningConfig, NegativesConfig
    from b3mine.mining import mine

    bare = mine(corpus_path, MiningConfig(batch_size=128, cluster_size=16, p=3, m=20,
                                          negatives=NegativesConfig(mode="none")),
                tmp_path, report=False)
    with pytest.raises(ValueError, match="has no extra negatives"):
        PlanBatchSampler(bare, negatives=True)


def test_for_accelerator_with_a_prepared_loader(plan, small_plan):
    accelerate = pytest.importorskip("accelerate")
    accelerator = accelerate.Accelerator(cpu=True)
    sampler = PlanBatchSampler.for_accelerator(plan, accelerator, dataset=RowDataset(N_ROWS))
    loader = accelerator.prepare(DataLoader(RowDataset(N_ROWS), batch_sampler=sampler))
    loader.set_epoch(1)
    assert [q.tolist() for q, _ in loader] == small_plan.batch_rows(1).tolist()
