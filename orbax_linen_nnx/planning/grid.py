"""The chunk grid of a stored array and the box arithmetic a plan's cost and its read share.

A box is a tuple of [lo, hi) per dimension; a stored array's chunks form a
regular grid (TensorStore's read chunk shape from its grid origin). The cost
model (`cost`) counts chunks and bytes with these, and the read engine
(`read`) reads by them, so neither imports the other.
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

import jax
import numpy as np

from orbax_linen_nnx.planning import ops

Box = ops.Box

# What a read holds decoded between storage and device shards unless told: this, or twice the largest stored
# chunk it reads where that is more (two large chunks then decode at once). The one place this rule lives.
DEFAULT_READ_BUDGET_BYTES = 64 * 2**20


def default_budget(largest_chunk_bytes: int) -> int:
  """The read budget when none is given (see `DEFAULT_READ_BUDGET_BYTES`)."""
  return max(DEFAULT_READ_BUDGET_BYTES, 2 * largest_chunk_bytes)


def box_of(index: tuple[slice, ...], shape: Sequence[int]) -> Box:
  return tuple(s.indices(n)[:2] for s, n in zip(index, shape))


def box_size(box: Box) -> int:
  return math.prod(hi - lo for lo, hi in box)


_count = box_size  # chunks in a box of chunk indices


def meet(a: Box, b: Box) -> bool:
  """Whether two boxes share an element."""
  for (alo, ahi), (blo, bhi) in zip(a, b):
    if alo >= bhi or blo >= ahi:
      return False
  return True


def union_count(grid, boxes: set) -> int:
  """How many distinct chunks some boxes of chunk indices cover together."""
  boxes = {b for b in boxes if _count(b)}
  if all(not meet(a, b) for a, b in itertools.combinations(boxes, 2)):
    return sum(_count(b) for b in boxes)
  return len({c for b in boxes for c in grid.chunks(b)})


class Grid:
  """The chunk grid of one stored array."""

  def __init__(self, store):
    self.shape = tuple(store.shape)
    chunk = store.chunk_layout.read_chunk.shape
    origin = store.chunk_layout.grid_origin
    self.chunk = tuple((c or max(n, 1)) for c, n in zip(chunk or self.shape, self.shape))
    self.origin = tuple(origin) if origin is not None else (0,) * len(self.shape)
    self.itemsize = store.dtype.numpy_dtype.itemsize

  def chunk_box(self, box: Box) -> Box:
    """The grid indices [lo, hi) per dimension of the chunks under `box` (empty for an empty box)."""
    out = []
    for (lo, hi), c, o in zip(box, self.chunk, self.origin):
      if hi <= lo:
        return tuple((0, 0) for _ in box)
      out.append(((lo - o) // c, (hi - 1 - o) // c + 1))
    return tuple(out)

  @staticmethod
  def chunks(chunk_box: Box) -> list[tuple[int, ...]]:
    return list(itertools.product(*(range(lo, hi) for lo, hi in chunk_box)))

  def box(self, chunk: tuple[int, ...]) -> Box:
    return tuple(
      (max(i * c + o, 0), min((i + 1) * c + o, n)) for i, c, o, n in zip(chunk, self.chunk, self.origin, self.shape)
    )

  def nbytes(self, box: Box) -> int:
    return box_size(box) * self.itemsize

  @property
  def chunk_nbytes(self) -> int:
    return math.prod(self.chunk) * self.itemsize


def primary_devices(sharding, replica_axis: str | None) -> set | None:
  """Devices at index 0 of `replica_axis`, if the target is replicated along it."""
  if replica_axis is None or not isinstance(sharding, jax.sharding.NamedSharding):
    return None
  mesh = sharding.mesh
  if replica_axis not in mesh.axis_names or mesh.shape[replica_axis] == 1:
    return None
  used = {a for entry in sharding.spec if entry is not None for a in (entry if isinstance(entry, tuple) else (entry,))}
  if replica_axis in used:
    return None  # sharded along it: every device holds different data
  return set(np.take(mesh.devices, 0, axis=mesh.axis_names.index(replica_axis)).flat)
