"""The transforms a plan entry applies to its sources: each one a lazy TensorStore view.

A `LeafRead.transform` is a tuple of these, applied in order; none moves data.
The reader then reads, through the final view, only each device's slice.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
import tensorstore as ts


@dataclasses.dataclass(frozen=True)
class Stack:
  """Stack the N sources along `axis` of the target (`tensorstore.stack`, lazy)."""

  axis: int

  def view(self, views: Sequence[ts.TensorStore]) -> ts.TensorStore:
    return ts.stack(list(views), axis=self.axis)

  def __str__(self) -> str:
    return f'stack axis {self.axis}'


@dataclasses.dataclass(frozen=True)
class Take:
  """Index `index` of the source's layer axis `axis` (the axis disappears)."""

  axis: int
  index: int

  def view(self, views: Sequence[ts.TensorStore]) -> ts.TensorStore:
    (v,) = views
    return v[ts.d[self.axis][self.index]]

  def __str__(self) -> str:
    return f'layer {self.index} of axis {self.axis}'


@dataclasses.dataclass(frozen=True)
class MoveAxis:
  """Move the source's layer axis `source` to position `destination`."""

  source: int
  destination: int

  def view(self, views: Sequence[ts.TensorStore]) -> ts.TensorStore:
    (v,) = views
    return v[ts.d[self.source].transpose[self.destination]]

  def __str__(self) -> str:
    return f'layer axis {self.source} -> {self.destination}'


@dataclasses.dataclass(frozen=True)
class Cast:
  """Convert on read (e.g. Linen's int32 step into NNX's uint32 step)."""

  source_dtype: Any
  dtype: Any

  def view(self, views: Sequence[ts.TensorStore]) -> ts.TensorStore:
    (v,) = views
    return ts.cast(v, ts.dtype(np.dtype(self.dtype).name))

  def __str__(self) -> str:
    return f'cast {np.dtype(self.source_dtype).name} -> {np.dtype(self.dtype).name}'


def apply(transform: Sequence[Any], sources: Sequence[ts.TensorStore]) -> ts.TensorStore:
  """The lazy view a transform makes of its sources (one source: that source, as is)."""
  views = list(sources)
  for op in transform:
    views = [op.view(views)]
  (view,) = views
  return view
