"""ShardedSampler: exactly once per epoch across ranks, equal lengths, padding, exact resume; eval shards."""

from __future__ import annotations

import math

import pytest

from vlp.data.sampler import ShardedSampler, eval_shard_indices


def _ranks(n, world, epoch=0, **kw):
    samplers = [ShardedSampler(n, world, r, **kw) for r in range(world)]
    for s in samplers:
        s.set_epoch(epoch)
    return samplers, [list(s) for s in samplers]


@pytest.mark.parametrize(("n", "world"), [(10, 1), (10, 3), (12, 4), (7, 8), (1, 4), (0, 2), (101, 8)])
def test_each_sample_once_and_equal_lengths(n, world):
    samplers, per_rank = _ranks(n, world, shuffle=True, seed=3)
    lengths = {len(indices) for indices in per_rank}
    assert lengths == {-(-n // world)} == {len(s) for s in samplers}

    real = [i for indices in per_rank for i in indices if i < n]
    pads = [i for indices in per_rank for i in indices if i >= n]
    assert sorted(real) == list(range(n))
    assert len(pads) == -(-n // world) * world - n
    assert all(n <= p < 2 * n for p in pads)  # encoded as index + num_samples


def test_epochs_reshuffle_identically_on_all_ranks():
    _, epoch0 = _ranks(50, 2, epoch=0)
    _, epoch0_again = _ranks(50, 2, epoch=0)
    _, epoch1 = _ranks(50, 2, epoch=1)
    assert epoch0 == epoch0_again
    assert epoch0 != epoch1
    assert sorted(epoch1[0] + epoch1[1]) == list(range(50))


def test_no_shuffle_is_strided_order():
    _, per_rank = _ranks(6, 2, shuffle=False)
    assert per_rank == [[0, 2, 4], [1, 3, 5]]


def test_mid_epoch_resume_continues_exactly():
    sampler = ShardedSampler(40, 2, 1, shuffle=True, seed=5, batch_size=4)
    sampler.set_epoch(3)
    full = list(sampler)
    sampler.advance()  # one full batch
    sampler.advance(4)
    sampler.advance(3)  # a batch whose raw size was 3
    state = sampler.state_dict()
    assert state["epoch"] == 3 and state["start"] == 11

    resumed = ShardedSampler(40, 2, 1, shuffle=True, seed=5, batch_size=4)
    resumed.load_state_dict(state)
    resumed.set_epoch(3)  # Lightning re-announces the same epoch on resume: the position is kept
    assert list(resumed) == full[11:]
    assert len(resumed) == 20  # len stays the full per-rank count, as Lightning expects


def test_new_epoch_resets_position_and_finished_epoch_moves_on():
    sampler = ShardedSampler(10, 1, 0, batch_size=5)
    sampler.advance()
    sampler.set_epoch(1)
    assert sampler.start == 0 and len(list(sampler)) == 10

    done = ShardedSampler(10, 1, 0, batch_size=5)
    done.load_state_dict({"epoch": 4, "start": 10, "num_samples": 10, "seed": 0})
    assert (done.epoch, done.start) == (5, 0)


def test_advance_is_capped_and_second_pass_restarts():
    sampler = ShardedSampler(6, 1, 0, shuffle=False, batch_size=4)
    sampler.advance()
    sampler.advance()
    assert sampler.start == 6
    assert list(sampler) == list(range(6))  # a consumed epoch iterated again without set_epoch starts over


def test_state_from_other_data_is_refused():
    sampler = ShardedSampler(10, 1, 0)
    with pytest.raises(ValueError, match="num_samples=12"):
        sampler.load_state_dict({"epoch": 0, "start": 3, "num_samples": 12, "seed": 0})


def test_on_epoch_callback_receives_epochs():
    received = []
    sampler = ShardedSampler(4, 1, 0, on_epoch=received.append)
    sampler.set_epoch(2)
    sampler.load_state_dict({"epoch": 7, "start": 1, "num_samples": 4, "seed": 0})
    assert received == [2, 7]


@pytest.mark.parametrize("bad", [{"rank": 2, "num_replicas": 2}, {"num_samples": -1}, {"batch_size": 0}])
def test_invalid_arguments(bad):
    args = {"num_samples": 4, "num_replicas": 1, "rank": 0, "batch_size": 1} | bad
    with pytest.raises(ValueError, match="invalid sampler arguments"):
        ShardedSampler(**args)


@pytest.mark.parametrize(("n", "world"), [(10, 3), (5, 5), (3, 4), (1000, 7)])
def test_eval_shards_partition_contiguously(n, world):
    shards = [eval_shard_indices(n, world, r) for r in range(world)]
    assert [i for s in shards for i in s] == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_dataset_pad_items_are_dropped_silently(build_dm, tokenizer):
    from vlp.data.collate import ImageTextCollator

    dm = build_dm(synthetic_train_size=3)
    dm.setup("fit")
    ds = dm.train_dataset
    assert ds[4] == {"pad": True, "index": 1}
    batch = ImageTextCollator(tokenizer, 16, 32)([ds[0], ds[4], ds[2]])
    assert batch["index"].tolist() == [0, 2] and batch["skipped"] == [] and batch["raw_size"] == 3


@pytest.mark.parametrize(("n", "world", "group"), [(24, 1, 4), (24, 2, 4), (22, 3, 2), (10, 4, 3), (5, 2, 6)])
def test_groups_stay_whole_in_one_batch_of_one_rank(n, world, group):
    batch = 2 * group
    samplers, per_rank = _ranks(n, world, shuffle=True, seed=7, batch_size=batch, group_size=group)

    # Every sample once, equal lengths (a whole number of groups per rank), padding encoded as index + n.
    groups_per_rank = math.ceil(math.ceil(n / group) / world)
    assert {len(indices) for indices in per_rank} == {groups_per_rank * group}
    assert sorted(i for indices in per_rank for i in indices if i < n) == list(range(n))
    assert all(n <= i < 2 * n for indices in per_rank for i in indices if i >= n)

    # Each aligned run of `group` slots holds one group's members in order (or padding), so a batch whose size
    # is a multiple of the group size never splits a group.
    for indices in per_rank:
        for start in range(0, len(indices), group):
            real = [i for i in indices[start : start + group] if i < n]
            if real:
                assert real == list(range(real[0], real[0] + len(real))) and real[0] % group == 0


def test_group_size_one_is_the_plain_sampler_and_groups_reshuffle():
    _, plain = _ranks(30, 3, shuffle=True, seed=2, batch_size=4)
    _, grouped = _ranks(30, 3, shuffle=True, seed=2, batch_size=4, group_size=1)
    assert plain == grouped
    _, epoch0 = _ranks(30, 1, epoch=0, batch_size=6, group_size=3)
    _, epoch1 = _ranks(30, 1, epoch=1, batch_size=6, group_size=3)
    assert epoch0 != epoch1 and sorted(epoch0[0]) == sorted(epoch1[0])


def test_group_size_must_divide_batch_and_is_part_of_the_resume_state():
    with pytest.raises(ValueError, match="multiple of group_size"):
        ShardedSampler(10, batch_size=4, group_size=3)
    state = ShardedSampler(12, batch_size=4, group_size=2).state_dict()
    with pytest.raises(ValueError, match="group_size"):
        ShardedSampler(12, batch_size=4, group_size=4).load_state_dict(state)


def test_synthetic_families_reach_the_model_together(build_dm):
    dm = build_dm(synthetic_train_size=16, synthetic_family_size=2, batch_size=4)
    dm.setup("fit")
    batches = [batch["index"].tolist() for batch in dm.train_dataloader()]
    assert sorted(i for b in batches for i in b) == list(range(16))
    for b in batches:
        assert sorted(b) == sorted({i - i % 2 for i in b} | {i - i % 2 + 1 for i in b})  # whole families
