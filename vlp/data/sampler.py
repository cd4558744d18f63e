"""Distributed sampling: every valid sample exactly once per epoch, equal work per rank, exact resume.

Training (:class:`ShardedSampler`)
    One global permutation per epoch (seeded by ``seed + epoch``, identical on every rank) is padded up to a
    multiple of ``num_replicas`` and dealt out strided, so each rank gets ``ceil(N / world)`` indices and DDP never
    waits on a rank that ran out. Padding slots are encoded as ``index + num_samples``: the dataset returns
    ``dict(pad=True)`` for them and the collator drops them silently, so no sample is trained on twice.
    With ``group_size`` g, groups of g consecutive indices are permuted and dealt as units, so a group (e.g. a
    synthetic scene family) always lands in one batch of one rank (the batch size must be a multiple of g).

Resume protocol
    ``start`` counts the indices of this rank already consumed in the current epoch. The training loop reports
    consumption with :meth:`ShardedSampler.advance` once per batch it has *trained on* (not when a worker
    prefetched it): ``advance(batch["raw_size"])``, or ``advance()`` for a full batch of ``batch_size``.
    Checkpoint :meth:`state_dict`; after :meth:`load_state_dict` the next iteration continues with index
    ``start`` of the same epoch's order. :meth:`set_epoch` with a new epoch resets ``start`` to 0; calling it with
    the current epoch (as Lightning does on resume) keeps it. ``len()`` stays the full per-rank count, matching
    Lightning, which resumes its batch counter mid-epoch and expects the remaining batches only.

Evaluation (:func:`eval_shard_indices`)
    Contiguous, unpadded shards: every image is embedded exactly once and results gathered in rank order are in
    dataset order. Shard sizes differ by at most one, so evaluation must not use per-batch collectives.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence

import torch
from torch.utils.data import Sampler

log = logging.getLogger(__name__)


class ShardedSampler(Sampler[int]):
    """Epoch-shuffled, padded, strided sharding with exact mid-epoch resume (see the module docstring)."""

    def __init__(
        self,
        num_samples: int,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        batch_size: int = 1,
        on_epoch: Callable[[int], None] | None = None,
        group_size: int = 1,
    ) -> None:
        # Arguments.
        if num_samples < 0 or num_replicas < 1 or not 0 <= rank < num_replicas or batch_size < 1:
            raise ValueError(
                f"invalid sampler arguments: num_samples={num_samples}, num_replicas={num_replicas}, rank={rank}, "
                f"batch_size={batch_size} (need num_samples >= 0, 0 <= rank < num_replicas, batch_size >= 1)"
            )
        if group_size < 1 or batch_size % group_size != 0:
            raise ValueError(f"batch_size={batch_size} must be a multiple of group_size={group_size} (>= 1)")
        self.num_samples, self.num_replicas, self.rank = num_samples, num_replicas, rank
        self.shuffle, self.seed, self.batch_size, self.group_size = shuffle, seed, batch_size, group_size
        # Called with the new epoch so the dataset can re-draw per-epoch choices (captions) in step.
        self.on_epoch = on_epoch

        # Equal share of groups per rank; the shortfall of the last round is padding.
        num_groups = -(-num_samples // group_size)
        self.per_rank = -(-num_groups // num_replicas) * group_size
        self.epoch = 0
        self.start = 0

    def __len__(self) -> int:
        return self.per_rank

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.start = int(epoch), 0
        if self.on_epoch is not None:
            self.on_epoch(self.epoch)

    def advance(self, n: int | None = None) -> None:
        """Record that ``n`` more indices of this rank were consumed (default: one full batch)."""
        self.start = min(self.per_rank, self.start + (self.batch_size if n is None else int(n)))

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "start": self.start,
            "num_samples": self.num_samples,
            "seed": self.seed,
            "group_size": self.group_size,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        # A different dataset or seed means the stored position refers to another order: refuse.
        saved = (state.get("num_samples", self.num_samples), state.get("seed", self.seed), state.get("group_size", 1))
        if saved != (self.num_samples, self.seed, self.group_size):
            raise ValueError(
                "sampler state was saved for num_samples={} seed={} group_size={}, but this run has num_samples={} "
                "seed={} group_size={} (data changed since the checkpoint)".format(
                    *saved, self.num_samples, self.seed, self.group_size
                )
            )
        self.epoch, self.start = int(state["epoch"]), int(state["start"])
        # A fully consumed epoch resumes at the start of the next one.
        if self.start >= self.per_rank:
            self.epoch, self.start = self.epoch + 1, 0
        if self.on_epoch is not None:
            self.on_epoch(self.epoch)

    def rank_indices(self, epoch: int | None = None) -> torch.Tensor:
        """All indices of this rank for ``epoch`` (default: current), padding encoded as index + num_samples."""
        epoch = self.epoch if epoch is None else epoch
        n, world, g = self.num_samples, self.num_replicas, self.group_size

        # Same permutation of groups (g consecutive indices) on every rank: seeded only by seed and epoch.
        num_groups = -(-n // g)
        if self.shuffle:
            order = torch.randperm(num_groups, generator=torch.Generator().manual_seed(self.seed + epoch))
        else:
            order = torch.arange(num_groups)

        # Pad to world * groups per rank with copies of the first groups, deal groups out strided, then expand
        # each group to its indices. Padding (copies, and the missing tail of a short last group) is re-encoded
        # as index + n. (With fewer groups than ranks the copies wrap around the order.)
        pad = self.per_rank // g * world - num_groups
        groups = torch.cat([order, order[torch.arange(pad) % max(num_groups, 1)]])  # (per_rank / g * world,)
        is_copy = torch.arange(groups.shape[0]) >= num_groups
        mine, mine_copy = groups[self.rank :: world], is_copy[self.rank :: world]  # (per_rank / g,)
        indices = mine[:, None] * g + torch.arange(g)  # (per_rank / g, g)
        padding = mine_copy[:, None] | (indices >= n)
        return torch.where(padding, indices % max(n, 1) + n, indices).flatten()  # (per_rank,)

    def __iter__(self) -> Iterator[int]:
        # A second pass over an epoch that was fully consumed without set_epoch starts it over.
        if self.start >= self.per_rank:
            log.debug("epoch %d already consumed; iterating it again from the start", self.epoch)
            self.start = 0
        return iter(self.rank_indices()[self.start :].tolist())


def eval_shard_indices(n: int, world: int, rank: int) -> range:
    """Contiguous, unpadded shard of ``range(n)`` for ``rank``; sizes differ by at most one."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world (got rank={rank}, world={world})")
    return range(rank * n // world, (rank + 1) * n // world)


class IndexSampler(Sampler[int]):
    """Yields a fixed list of indices in order (an evaluation shard)."""

    def __init__(self, indices: Sequence[int]) -> None:
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)
