"""Which positions of a global batch one data-parallel rank takes.

The single definition shared by the service (``?rank=&world_size=``) and the trainers' samplers,
so every rank agrees on the split: rank ``r`` of ``w`` takes positions ``[r*B/w, (r+1)*B/w)`` of
a batch of ``B`` rows, and ``B`` must divide by ``w`` (an uneven split would give ranks
different local batch sizes and break the all-gather of a contrastive loss).

>>> rank_slice(1024, rank=1, world_size=4)
slice(256, 512, None)
"""
from __future__ import annotations

from b3mine.errors import InputError


class ShardError(InputError):
    """A rank/world_size pair that cannot split the batch; ``field`` names the culprit."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def rank_slice(batch_size: int, rank: int, world_size: int) -> slice:
    """Positions of ``rank`` (0-based) among ``world_size`` ranks in a batch of ``batch_size``."""
    if world_size < 1:
        raise ShardError("world_size", f"world_size must be >= 1 (got {world_size})")
    if not 0 <= rank < world_size:
        raise ShardError("rank", f"rank must be in [0, {world_size}) (got {rank})")
    if batch_size % world_size:
        raise ShardError("world_size", f"batch_size {batch_size} is not divisible by "
                         f"world_size {world_size}")
    per = batch_size // world_size
    return slice(rank * per, (rank + 1) * per)
