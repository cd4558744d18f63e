"""Collectives that also work on a single process where ``torch.distributed`` is not initialised.

Every function here is a no-op (or the identity) when there is one process, so model and loss code call
them unconditionally. Gathers accept a different first dimension on every rank (short last batches,
uneven evaluation shards): sizes are exchanged first and the tensors padded to the largest.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def _gather_sizes(x: torch.Tensor) -> list[int]:
    size = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(get_world_size())]
    dist.all_gather(sizes, size)
    return [int(s.item()) for s in sizes]


def _all_gather_padded(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    # Pad to the largest rank's size, gather, then drop each rank's padding.
    max_size = max(sizes)
    padded = x.new_zeros((max_size, *x.shape[1:]))
    padded[: x.shape[0]] = x
    chunks = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(chunks, padded.contiguous())
    return torch.cat([chunk[:n] for chunk, n in zip(chunks, sizes)])  # (sum(sizes), ...)


@torch.no_grad()
def all_gather_nograd(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0, without gradient (momentum features, ids, queues)."""
    if not is_dist():
        return x
    return _all_gather_padded(x.detach(), _gather_sizes(x))


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward returns to each rank the summed gradient of its own slice.

    Every rank's loss uses every rank's features, so the gradient of a rank's features is the sum of the
    gradients from all ranks' losses. An all-reduce of the full gradient followed by slicing is used
    instead of reduce-scatter because gloo (CPU) does not implement reduce-scatter.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        sizes = _gather_sizes(x)
        ctx.rank_slice = (sum(sizes[: get_rank()]), sizes[get_rank()])
        return _all_gather_padded(x, sizes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start, length = ctx.rank_slice
        return grad[start : start + length]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0; gradients flow back to the rank that produced each row."""
    if not is_dist():
        return x
    return _GatherWithGrad.apply(x)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks without gradient; the identity on one process."""
    if not is_dist():
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x


def rank_offset(n_local: int, device: torch.device | None = None) -> int:
    """Position of this rank's first row in a tensor gathered with the functions above."""
    if not is_dist():
        return 0
    sizes = _gather_sizes(torch.empty(n_local, device=device))
    return sum(sizes[: get_rank()])
