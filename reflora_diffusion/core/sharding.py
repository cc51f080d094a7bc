"""LoRA factors sharded by FSDP2 (``fully_shard``): DTensor parameters split on dim 0 over one process group.

FSDP2 shards every parameter on dim 0, like ``torch.chunk``: A (r x d_in) by rows of r, B (d_out x r) by rows of
d_out. What the core needs from the other ranks (docs/methods.md section 2):

- B^T B = sum over the row shards of B_i^T B_i: a partial r x r per rank, summed;
- A A^T mixes rows of different ranks, and so does the new G_A = P_A G_A: the rows of A and G_A are gathered
  (O(r x d_in) per layer); G_B <- G_B P_B and the rescalings of RefLoRA-S are row-local;
- ||A||_F, ||B||_F (RefLoRA-S): sums of squared local norms.

:func:`gather_rows` does the first two for a whole bucket of equal shapes in ONE all-gather, so every rank computes
the same r x r algebra on the same numbers. Collectives are enqueued without reading values on the host.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

try:
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # torch built without distributed support
    DTensor = Shard = None

__all__ = ["local", "shard_group", "row_sizes", "gather_rows", "all_sum"]


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: torch.Tensor | None) -> torch.Tensor | None:
    """This rank's shard of a DTensor (the storage itself: in-place writes reach the parameter), else ``t``."""
    return t.to_local() if is_dtensor(t) else t


def shard_group(t: torch.Tensor):
    """The process group ``t`` is sharded over on dim 0 (FSDP2), or None for a whole tensor."""
    if not is_dtensor(t):
        return None
    sharded = [i for i, pl in enumerate(t.placements) if not pl.is_replicate()]
    if not sharded:
        return None
    if len(sharded) != 1 or t.placements[sharded[0]] != Shard(0):
        raise ValueError(f"LoRA factor sharded as {t.placements}; the core supports FSDP2's Shard(0) on one mesh "
                         "dimension (fully_shard, HSDP included)")
    return t.device_mesh.get_group(sharded[0])


def row_sizes(rows: int, world: int) -> list[int]:
    """Rows of each rank when ``rows`` are split like torch.chunk (FSDP2's rule; trailing ranks may get none)."""
    per = -(-rows // world)
    return [max(0, min(per, rows - j * per)) for j in range(world)]


def gather_rows(shards: torch.Tensor, rows: int, partial: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """One all-gather for a bucket: whole row-sharded matrices and the sum over ranks of per-rank partials.

    shards: (n, k, local rows, d), k matrices per layer sharded by rows (``rows`` in all);
    partial: (n, e) per-rank partial sums. Returns (n, k, rows, d) and (n, e), identical on every rank.
    """
    world = dist.get_world_size(group)
    sizes = row_sizes(rows, world)
    n, k, mine, d = shards.shape
    if mine != sizes[dist.get_rank(group)]:
        raise ValueError(f"a LoRA factor has {mine} local rows, expected {sizes} over the ranks: the core expects "
                         "FSDP2's even dim-0 sharding (torch.chunk)")
    padded = shards.new_zeros(n, k, sizes[0], d)
    padded[:, :, :mine] = shards
    send = torch.cat([padded.reshape(n, -1), partial.to(shards.dtype)], dim=1)
    recv = send.new_empty(world * n, send.shape[1])
    dist.all_gather_into_tensor(recv, send, group=group)
    recv = recv.view(world, n, -1)
    blocks = recv[:, :, :k * sizes[0] * d].reshape(world, n, k, sizes[0], d)
    whole = torch.cat([blocks[j, :, :, :sizes[j]] for j in range(world)], dim=2)
    return whole, recv[:, :, k * sizes[0] * d:].sum(0)


def local_rows(rows: int, group) -> slice:
    """This rank's rows of a ``rows``-row matrix sharded over ``group``."""
    sizes = row_sizes(rows, dist.get_world_size(group))
    rank = dist.get_rank(group)
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def all_sum(t: torch.Tensor, group) -> torch.Tensor:
    """Sum ``t`` over ``group`` in place (nothing for group None)."""
    if group is not None:
        dist.all_reduce(t, group=group)
    return t
