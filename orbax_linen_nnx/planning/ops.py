"""What a plan does to stored arrays on the way to a target: pure op descriptions.

Each op says three things, all without IO:

- `shape(input_shapes)`: the shape it makes;
- `needs(box, input_shapes)`: for a box of its output (one device's slice), the
  box of each input it reads, or None for an input it does not touch;
- `apply(box, parts)`: the output box, computed on the host from those input
  boxes (`parts`, in input order, the untouched inputs left out); never
  asked for an empty box;
- `regions(box, input_shapes)`: where each needed input box lands in the
  output box, as a function from the output array to a numpy *view* of it
  shaped like that input box (None where the op moves no element as it is:
  a reshape). The reader copies each decoded chunk straight into place
  through these views, so a slice is assembled without intermediate copies.

The reader (read.py) walks these from each device slice down to the stored
arrays, reads each stored chunk once, and applies the ops to the pieces. A
box is a tuple of (start, stop) per dimension.

>>> Stack(0).needs(((1, 3), (0, 4)), [(4,), (4,), (4,)])
[None, ((0, 4),), ((0, 4),)]
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np

Box = tuple[tuple[int, int], ...]
Shape = tuple[int, ...]


def box_shape(box: Box) -> Shape:
  return tuple(hi - lo for lo, hi in box)


class Op:
  """What every op says about itself besides its boxes: the dtype it makes, and its form over a layer stack."""

  def shape(self, shapes: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
    """The output shape from the inputs' `shapes`."""
    raise TypeError(f'{self} states no shape')  # every op below does

  def out_dtype(self, dtypes: Sequence[Any]) -> np.dtype:
    """The dtype made from inputs of `dtypes`: the first input's, unless the op casts."""
    return np.dtype(dtypes[0])

  def lifted(self, layers: int) -> 'Op':
    """The op on arrays with one more leading axis of `layers` entries (a layer stack), that axis kept."""
    raise TypeError(f'no stacked form of {self}')  # every op below has one

  def image(self, box: Box, index: int, shapes) -> Box | None:
    """The output box a box of input `index` lands in (None: the op uses none of it).

    `needs` run the other way: for every op that moves elements as they are,
    `needs(image(box))` asks input `index` for `box` again. A reshape has no
    box image (the elements of a box of its input are no box of its output):
    its `moves_boxes` is False.
    """
    return None

  moves_boxes = True  # whether `image` is exact: every element of an input box lands in the output box

  def spec(self, specs: Sequence[list]) -> list | None:
    """The output's PartitionSpec entries (one per axis), from each input's (None: none to carry, the
    output is laid out anew). An op that moves axes moves their entries; every op states its own rule."""
    raise TypeError(f'no sharding rule for {self}')  # every op below states one (tests/test_ops.py checks)

  def carry(self, data: np.ndarray, box: Box, index: int, shapes) -> np.ndarray:
    """The values of `image(box, index, shapes)`, from `data`, the values of that input box (a view where one
    will do)."""
    return data


def identity(out):
  """The region of an input that fills the whole output as it is."""
  return out


@dataclasses.dataclass(frozen=True)
class Stack(Op):
  """Stack N inputs along `axis` (per-layer arrays -> one layer stack)."""

  axis: int

  def shape(self, shapes):
    return tuple(shapes[0][: self.axis]) + (len(shapes),) + tuple(shapes[0][self.axis :])

  def needs(self, box, shapes):
    lo, hi = box[self.axis]
    rest = box[: self.axis] + box[self.axis + 1 :]
    return [rest if lo <= i < hi else None for i in range(len(shapes))]

  def apply(self, box, parts):
    return np.stack(parts, axis=self.axis)

  def regions(self, box, shapes):
    lo = box[self.axis][0]
    at = (slice(None),) * self.axis
    return [
      (lambda out, i=i: out[at + (i - lo,)]) if b is not None else None for i, b in enumerate(self.needs(box, shapes))
    ]

  def image(self, box, index, shapes):
    return box[: self.axis] + ((index, index + 1),) + box[self.axis :]

  def carry(self, data, box, index, shapes):
    return np.expand_dims(data, self.axis)

  def spec(self, specs):
    return specs[0][: self.axis] + [None] + specs[0][self.axis :]  # the new axis is laid out whole

  def lifted(self, layers):
    return Stack(self.axis + 1)

  def __str__(self):
    return f'stack axis {self.axis}'


@dataclasses.dataclass(frozen=True)
class Concat(Op):
  """Concatenate inputs along `axis` (e.g. two projections fused into one)."""

  axis: int

  def shape(self, shapes):
    s = list(shapes[0])
    s[self.axis] = sum(x[self.axis] for x in shapes)
    return tuple(s)

  def needs(self, box, shapes):
    lo, hi = box[self.axis]
    out, start = [], 0
    for shape in shapes:
      n = shape[self.axis]
      s, e = max(lo, start), min(hi, start + n)
      if s < e:
        b = list(box)
        b[self.axis] = (s - start, e - start)
        out.append(tuple(b))
      else:
        out.append(None)
      start += n
    return out

  def apply(self, box, parts):
    return np.concatenate(parts, axis=self.axis)

  def regions(self, box, shapes):
    lo, out, start = box[self.axis][0], [], 0
    at = (slice(None),) * self.axis
    for shape, b in zip(shapes, self.needs(box, shapes)):
      if b is None:
        out.append(None)
      else:
        s, e = b[self.axis][0] + start - lo, b[self.axis][1] + start - lo
        out.append(lambda o, s=s, e=e: o[at + (slice(s, e),)])
      start += shape[self.axis]
    return out

  def image(self, box, index, shapes):
    start = sum(s[self.axis] for s in shapes[:index])
    lo, hi = box[self.axis]
    return box[: self.axis] + ((lo + start, hi + start),) + box[self.axis + 1 :]

  def spec(self, specs):
    return list(specs[0])  # the axes stay where they are

  def lifted(self, layers):
    return Concat(self.axis + 1)

  def __str__(self):
    return f'concat axis {self.axis}'


@dataclasses.dataclass(frozen=True)
class Slice(Op):
  """Elements [start, stop) of `axis` (one part of a split)."""

  axis: int
  start: int
  stop: int

  def shape(self, shapes):
    s = list(shapes[0])
    s[self.axis] = self.stop - self.start
    return tuple(s)

  def needs(self, box, shapes):
    b = list(box)
    lo, hi = box[self.axis]
    b[self.axis] = (lo + self.start, hi + self.start)
    return [tuple(b)]

  def apply(self, box, parts):
    return parts[0]

  def regions(self, box, shapes):
    return [identity]

  def image(self, box, index, shapes):
    lo, hi = max(box[self.axis][0], self.start), min(box[self.axis][1], self.stop)
    if lo >= hi:
      return None
    return box[: self.axis] + ((lo - self.start, hi - self.start),) + box[self.axis + 1 :]

  def carry(self, data, box, index, shapes):
    lo, hi = box[self.axis]
    at = (slice(None),) * self.axis
    return data[at + (slice(max(lo, self.start) - lo, min(hi, self.stop) - lo),)]

  def spec(self, specs):
    return list(specs[0])

  def lifted(self, layers):
    return Slice(self.axis + 1, self.start, self.stop)

  def __str__(self):
    return f'[{self.start}:{self.stop}] of axis {self.axis}'


@dataclasses.dataclass(frozen=True)
class Take(Op):
  """Index `index` of `axis`; the axis disappears (one layer of a stack)."""

  axis: int
  index: int

  def shape(self, shapes):
    return tuple(shapes[0][: self.axis]) + tuple(shapes[0][self.axis + 1 :])

  def needs(self, box, shapes):
    return [box[: self.axis] + ((self.index, self.index + 1),) + box[self.axis :]]

  def apply(self, box, parts):
    return np.squeeze(parts[0], axis=self.axis)

  def regions(self, box, shapes):
    return [lambda out: np.expand_dims(out, self.axis)]

  def image(self, box, index, shapes):
    lo, hi = box[self.axis]
    return box[: self.axis] + box[self.axis + 1 :] if lo <= self.index < hi else None

  def carry(self, data, box, index, shapes):
    return data[(slice(None),) * self.axis + (self.index - box[self.axis][0],)]

  def spec(self, specs):
    return specs[0][: self.axis] + specs[0][self.axis + 1 :]  # the taken axis is gone

  def lifted(self, layers):
    return Take(self.axis + 1, self.index)

  def __str__(self):
    return f'layer {self.index} of axis {self.axis}'


@dataclasses.dataclass(frozen=True)
class Transpose(Op):
  """Permute axes like `numpy.transpose(x, perm)`."""

  perm: tuple[int, ...]

  def shape(self, shapes):
    return tuple(shapes[0][p] for p in self.perm)

  def needs(self, box, shapes):
    b = [None] * len(self.perm)
    for out_axis, in_axis in enumerate(self.perm):
      b[in_axis] = box[out_axis]
    return [tuple(b)]

  def apply(self, box, parts):
    return np.transpose(parts[0], self.perm)

  def regions(self, box, shapes):
    back = tuple(int(a) for a in np.argsort(self.perm))
    return [lambda out: np.transpose(out, back)]

  def image(self, box, index, shapes):
    return tuple(box[p] for p in self.perm)

  def carry(self, data, box, index, shapes):
    return np.transpose(data, self.perm)

  def spec(self, specs):
    return [specs[0][p] for p in self.perm]

  def lifted(self, layers):
    return Transpose((0,) + tuple(p + 1 for p in self.perm))

  def __str__(self):
    return f'transpose {self.perm}'


@dataclasses.dataclass(frozen=True)
class MoveAxis(Op):
  """Move axis `source` to position `destination` (a stack's layer axis)."""

  source: int
  destination: int

  def _transpose(self, ndim: int) -> Transpose:
    order = [a for a in range(ndim) if a != self.source]
    order.insert(self.destination, self.source)
    return Transpose(tuple(order))

  def shape(self, shapes):
    return self._transpose(len(shapes[0])).shape(shapes)

  def needs(self, box, shapes):
    return self._transpose(len(box)).needs(box, shapes)

  def apply(self, box, parts):
    return self._transpose(len(box)).apply(box, parts)

  def regions(self, box, shapes):
    return self._transpose(len(box)).regions(box, shapes)

  def image(self, box, index, shapes):
    return self._transpose(len(box)).image(box, index, shapes)

  def carry(self, data, box, index, shapes):
    return np.moveaxis(data, self.source, self.destination)

  def spec(self, specs):
    rest = specs[0][: self.source] + specs[0][self.source + 1 :]
    return rest[: self.destination] + [specs[0][self.source]] + rest[self.destination :]

  def lifted(self, layers):
    return MoveAxis(self.source + 1, self.destination + 1)

  def __str__(self):
    return f'layer axis {self.source} -> {self.destination}'


@dataclasses.dataclass(frozen=True)
class Cast(Op):
  """Convert the dtype on read."""

  source_dtype: Any
  dtype: Any

  def shape(self, shapes):
    return tuple(shapes[0])

  def needs(self, box, shapes):
    return [box]

  def apply(self, box, parts):
    return parts[0].astype(self.dtype)

  def regions(self, box, shapes):
    return [identity]  # numpy casts on assignment

  def out_dtype(self, dtypes):
    return np.dtype(self.dtype)

  def image(self, box, index, shapes):
    return box

  def carry(self, data, box, index, shapes):
    return data.astype(self.dtype)

  def spec(self, specs):
    return list(specs[0])

  def lifted(self, layers):
    return self

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
class Reshape(Op):
  """Merge or split adjacent axes ((D, H, K) <-> (D, H*K)).

  A target box needs the smallest source box that covers it: whole inner axes
  of each merged block, the rows its elements fall in on the outer one.
  """

  source_shape: tuple[int, ...]
  target_shape: tuple[int, ...]

  def shape(self, shapes):
    return tuple(self.target_shape)

  def _blocks(self, box):
    """Per block of axes: source rows (lo, hi), the flat picks, the block's box shape."""
    for src_axes, dst_axes in _groups(self.source_shape, self.target_shape):
      dst_shape = [self.target_shape[j] for j in dst_axes]
      grid = np.meshgrid(*[np.arange(*box[j]) for j in dst_axes], indexing='ij')
      flat = np.ravel_multi_index([g.ravel() for g in grid], dst_shape)
      inner = math.prod(self.source_shape[i] for i in src_axes[1:])
      lo, hi = (int(flat.min()) // inner, int(flat.max()) // inner + 1) if flat.size else (0, 0)
      yield src_axes, (lo, hi), flat - lo * inner, (hi - lo) * inner, [box[j][1] - box[j][0] for j in dst_axes]

  def needs(self, box, shapes):
    b = []
    for src_axes, rows, _, _, _ in self._blocks(box):
      b += [rows] + [(0, self.source_shape[i]) for i in src_axes[1:]]
    return [tuple(b)]

  def apply(self, box, parts):
    blocks = list(self._blocks(box))
    # Collapse each block to one axis, pick the asked-for elements, restore the target axes.
    data = parts[0].reshape([size for *_, size, _ in blocks])
    for axis, (_, _, flat, _, _) in enumerate(blocks):
      data = np.take(data, flat, axis=axis)
    return data.reshape([n for *_, dims in blocks for n in dims])

  def regions(self, box, shapes):
    return [None]  # elements move: computed by `apply` on the host

  moves_boxes = False  # elements move: a box of the source is rows of the target, not a box

  def spec(self, specs):
    return None  # no box image (moves_boxes is False): its output is laid out anew, never carried

  def lifted(self, layers):
    return Reshape((layers,) + tuple(self.source_shape), (layers,) + tuple(self.target_shape))

  def __str__(self):
    return f'reshape {tuple(self.source_shape)} -> {tuple(self.target_shape)}'


# Every op, for the tables that interpret them elsewhere (read.py: TensorStore views; save.py: jax).
ALL = (Stack, Concat, Slice, Take, Transpose, MoveAxis, Cast, Reshape)


# ---------------------------------------------------------------- expressions


@dataclasses.dataclass(frozen=True)
class Derived:
  """An array made from stored ones: `op` over `args` (stored arrays or Derived), its shape and dtype.

  Rules make these from the checkpoint's arrays, the planner adds its layer
  and cast ops, and the reader, the save and the command line all walk the
  same tree.
  """

  op: Op
  args: tuple[Any, ...]
  path: tuple[str, ...]
  shape: tuple[int, ...]
  dtype: Any

  @property
  def name(self) -> str:
    return f"{self.op}({', '.join(a.name for a in self.args)})"

  def leaves(self) -> list:
    return [x for a in self.args for x in stored_leaves(a)]

  def __str__(self) -> str:
    dtype = np.dtype(self.dtype).name
    return f"'{'/'.join(self.path) or '<root>'}' {tuple(self.shape)} {dtype} (= {self.name})"


def images(expr, name: str, box: Box) -> list[Box]:
  """Where a box of stored array `name` lands in `expr` (see `carried`), without the values."""
  op = getattr(expr, 'op', None)
  if op is None:
    return [box] if expr.name == name else []
  shapes = [tuple(a.shape) for a in expr.args]
  out = []
  for i, arg in enumerate(expr.args):
    for b in images(arg, name, box):
      image = op.image(b, i, shapes)
      if image is not None and all(lo < hi for lo, hi in image):
        out.append(image)
  return out


def carried(expr, name: str, box: Box, data: np.ndarray) -> list[tuple[Box, np.ndarray]]:
  """Where a box of stored array `name` (its values `data`) lands in `expr`, and its values there.

  One (box, values) per place the array appears in the expression (usually
  one); none where the expression uses no part of the box. Every op on the
  way must move boxes (`Op.moves_boxes`).
  """
  op = getattr(expr, 'op', None)
  if op is None:
    return [(box, data)] if expr.name == name else []
  shapes = [tuple(a.shape) for a in expr.args]
  out = []
  for i, arg in enumerate(expr.args):
    for b, d in carried(arg, name, box, data):
      image = op.image(b, i, shapes)
      if image is not None and all(lo < hi for lo, hi in image):
        out.append((image, op.carry(d, b, i, shapes)))
  return out


def needed(expr, box: Box) -> list[tuple[str, Box]]:
  """The box of each stored array that computing `box` of `expr` reads (the read engine's inputs)."""
  op = getattr(expr, 'op', None)
  if op is None:
    return [(expr.name, box)]
  shapes = [tuple(a.shape) for a in expr.args]
  return [x for a, b in zip(expr.args, op.needs(box, shapes)) if b is not None for x in needed(a, b)]


def stored_leaves(expr) -> list:
  """The stored arrays an expression reads."""
  return expr.leaves() if isinstance(expr, Derived) else [expr]


def derive(op: Op, args: Sequence[Any], path: tuple[str, ...]) -> Derived:
  """`op` over `args`, its shape and dtype computed from theirs."""
  shape = op.shape([tuple(a.shape) for a in args])
  return Derived(op, tuple(args), path, tuple(shape), op.out_dtype([a.dtype for a in args]))
