"""What a plan does to stored arrays on the way to a target: lazy, slice-at-a-time ops.

Each op knows the shape it makes and how to become a TensorStore view of its
inputs (`tensorstore.stack`/`concat`, index transforms, `cast`), so nothing is
read until the reader asks for one device's slice. Reshape has no TensorStore
view: it reads the smallest source box that covers the slice asked for and
reshapes that box on the host; ops above it then work on host slices too.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import Any, Sequence

import numpy as np
import tensorstore as ts

Index = tuple[slice, ...]


def _bounds(index: Index, shape: Sequence[int]) -> list[tuple[int, int]]:
  return [s.indices(n)[:2] for s, n in zip(index, shape)]


class Lazy(abc.ABC):
  """An array not read yet: `await lazy.read(index)` reads just that slice."""

  shape: tuple[int, ...]
  dtype: Any

  @abc.abstractmethod
  async def read(self, index: Index) -> np.ndarray:
    """The slice `index` of the array, read now."""


class TsLazy(Lazy):
  """A TensorStore view: reads go straight to the chunks under the slice."""

  def __init__(self, view: ts.TensorStore):
    self.view = view
    self.shape = tuple(view.shape)
    self.dtype = view.dtype.numpy_dtype

  async def read(self, index: Index) -> np.ndarray:
    return await self.view[index].read()


class HostLazy(Lazy):
  """An op over inputs that are not all TensorStore views, computed per slice."""

  def __init__(self, op, args: Sequence[Lazy], shape, dtype):
    self.op, self.args, self.shape, self.dtype = op, list(args), tuple(shape), np.dtype(dtype)

  async def read(self, index: Index) -> np.ndarray:
    return await self.op.host_read(self.args, _bounds(index, self.shape))


@dataclasses.dataclass(frozen=True)
class Stack:
  """Stack N inputs along `axis` (per-layer arrays -> one layer stack)."""

  axis: int

  def shape(self, shapes):
    return shapes[0][: self.axis] + (len(shapes),) + shapes[0][self.axis:]

  def view(self, views):
    return ts.stack(list(views), axis=self.axis)

  async def host_read(self, args, b):
    lo, hi = b[self.axis]
    rest = tuple(slice(*x) for x in b[: self.axis] + b[self.axis + 1:])
    parts = [await args[i].read(rest) for i in range(lo, hi)]
    return np.stack(parts, axis=self.axis)

  def __str__(self):
    return f'stack axis {self.axis}'


@dataclasses.dataclass(frozen=True)
class Concat:
  """Concatenate inputs along `axis` (e.g. two projections fused into one)."""

  axis: int

  def shape(self, shapes):
    s = list(shapes[0])
    s[self.axis] = sum(x[self.axis] for x in shapes)
    return tuple(s)

  def view(self, views):
    return ts.concat(list(views), axis=self.axis)

  async def host_read(self, args, b):
    lo, hi = b[self.axis]
    parts, start = [], 0
    for a in args:
      n = a.shape[self.axis]
      s, e = max(lo, start), min(hi, start + n)
      if s < e:
        idx = [slice(*x) for x in b]
        idx[self.axis] = slice(s - start, e - start)
        parts.append(await a.read(tuple(idx)))
      start += n
    return np.concatenate(parts, axis=self.axis)

  def __str__(self):
    return f'concat axis {self.axis}'


@dataclasses.dataclass(frozen=True)
class Slice:
  """Elements [start, stop) of `axis` (one part of a split)."""

  axis: int
  start: int
  stop: int

  def shape(self, shapes):
    s = list(shapes[0])
    s[self.axis] = self.stop - self.start
    return tuple(s)

  def view(self, views):
    (v,) = views
    return v[ts.d[self.axis][self.start:self.stop].translate_to[0]]

  async def host_read(self, args, b):
    idx = [slice(*x) for x in b]
    lo, hi = b[self.axis]
    idx[self.axis] = slice(lo + self.start, hi + self.start)
    return await args[0].read(tuple(idx))

  def __str__(self):
    return f'[{self.start}:{self.stop}] of axis {self.axis}'


@dataclasses.dataclass(frozen=True)
class Take:
  """Index `index` of `axis`; the axis disappears (one layer of a stack)."""

  axis: int
  index: int

  def shape(self, shapes):
    return shapes[0][: self.axis] + shapes[0][self.axis + 1:]

  def view(self, views):
    (v,) = views
    return v[ts.d[self.axis][self.index]]

  async def host_read(self, args, b):
    idx = [slice(*x) for x in b]
    idx.insert(self.axis, slice(self.index, self.index + 1))
    return np.squeeze(await args[0].read(tuple(idx)), axis=self.axis)

  def __str__(self):
    return f'layer {self.index} of axis {self.axis}'


@dataclasses.dataclass(frozen=True)
class Transpose:
  """Permute axes like `numpy.transpose(x, perm)`."""

  perm: tuple[int, ...]

  def shape(self, shapes):
    return tuple(shapes[0][p] for p in self.perm)

  def view(self, views):
    (v,) = views
    return v[ts.d[list(self.perm)].transpose[:]]

  async def host_read(self, args, b):
    idx = [None] * len(self.perm)
    for out_axis, in_axis in enumerate(self.perm):
      idx[in_axis] = slice(*b[out_axis])
    return np.transpose(await args[0].read(tuple(idx)), self.perm)

  def __str__(self):
    return f'transpose {self.perm}'


@dataclasses.dataclass(frozen=True)
class MoveAxis:
  """Move axis `source` to position `destination` (a stack's layer axis)."""

  source: int
  destination: int

  def _perm(self, ndim):
    order = [a for a in range(ndim) if a != self.source]
    order.insert(self.destination, self.source)
    return Transpose(tuple(order))

  def shape(self, shapes):
    return self._perm(len(shapes[0])).shape(shapes)

  def view(self, views):
    (v,) = views
    return v[ts.d[self.source].transpose[self.destination]]

  async def host_read(self, args, b):
    return await self._perm(len(b)).host_read(args, b)

  def __str__(self):
    return f'layer axis {self.source} -> {self.destination}'


@dataclasses.dataclass(frozen=True)
class Cast:
  """Convert the dtype on read."""

  source_dtype: Any
  dtype: Any

  def shape(self, shapes):
    return shapes[0]

  def view(self, views):
    (v,) = views
    return ts.cast(v, ts.dtype(np.dtype(self.dtype).name))

  async def host_read(self, args, b):
    return (await args[0].read(tuple(slice(*x) for x in b))).astype(self.dtype)

  def __str__(self):
    return f'cast {np.dtype(self.source_dtype).name} -> {np.dtype(self.dtype).name}'


def _groups(src: Sequence[int], dst: Sequence[int]) -> list[tuple[range, range]]:
  """Splits a reshape into blocks of adjacent source and target axes of equal size."""
  out, i, j = [], 0, 0
  while i < len(src) and j < len(dst):
    i0, j0, p, q = i, j, src[i], dst[j]
    i, j = i + 1, j + 1
    while p != q:
      if p < q:
        p, i = p * src[i], i + 1
      else:
        q, j = q * dst[j], j + 1
    out.append((range(i0, i), range(j0, j)))
  if out and (i < len(src) or j < len(dst)):  # trailing axes of size 1
    (a, b) = out[-1]
    out[-1] = (range(a.start, len(src)), range(b.start, len(dst)))
  return out


@dataclasses.dataclass(frozen=True)
class Reshape:
  """Merge or split adjacent axes ((D, H, K) <-> (D, H*K)).

  Not a view of the stored chunks: each slice reads the smallest source box
  that covers it (whole inner axes of each merged block) and is cut on the host.
  """

  source_shape: tuple[int, ...]
  target_shape: tuple[int, ...]

  def shape(self, shapes):
    return tuple(self.target_shape)

  view = None  # TensorStore has no reshape view

  async def host_read(self, args, b):
    box, picks = [], []
    for src_axes, dst_axes in _groups(self.source_shape, self.target_shape):
      dst_shape = [self.target_shape[j] for j in dst_axes]
      src_shape = [self.source_shape[i] for i in src_axes]
      grid = np.meshgrid(*[np.arange(*b[j]) for j in dst_axes], indexing='ij')
      flat = np.ravel_multi_index([g.ravel() for g in grid], dst_shape)
      inner = math.prod(src_shape[1:])
      lo, hi = int(flat.min()) // inner, int(flat.max()) // inner + 1
      box += [slice(lo, hi)] + [slice(None)] * (len(src_axes) - 1)
      picks.append((flat - lo * inner, (hi - lo) * inner, [e - s for s, e in (b[j] for j in dst_axes)]))
    data = await args[0].read(tuple(box))
    # Collapse each block to one axis, pick the asked-for elements, restore the target axes.
    data = data.reshape([size for _, size, _ in picks])
    for axis, (flat, _, _) in enumerate(picks):
      data = np.take(data, flat, axis=axis)
    return data.reshape([n for _, _, dims in picks for n in dims])

  def __str__(self):
    return f'reshape {tuple(self.source_shape)} -> {tuple(self.target_shape)}'


async def build(op, args: Sequence[Lazy]) -> Lazy:
  """The lazy result of `op` over `args`: a TensorStore view where one exists."""
  shape = op.shape([a.shape for a in args])
  if op.view is not None and all(isinstance(a, TsLazy) for a in args):
    return TsLazy(op.view([a.view for a in args]))
  dtype = np.dtype(op.dtype) if isinstance(op, Cast) else args[0].dtype
  return HostLazy(op, args, shape, dtype)
