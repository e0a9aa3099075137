"""Two checkpoints in any layouts, compared leaf by leaf through the same plan as a restore.

`orbax-linen-nnx compare A B` runs `compare`: A is read as B's tree (rules and
stacks as a restore takes them), a batch at a time, and each leaf is compared
with B's, bit for bit unless tolerances are given.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import numpy as np

from orbax_linen_nnx import layout
from orbax_linen_nnx.planning import ops
from orbax_linen_nnx.planning import options as options_lib
from orbax_linen_nnx.engine import prepare as prepare_lib
from orbax_linen_nnx.planning import plans
from orbax_linen_nnx.engine import read as read_lib
from orbax_linen_nnx.engine import source as source_lib
from orbax_linen_nnx.faces.convert import DEFAULT_BATCH_BYTES, batches, with_shardings


@dataclasses.dataclass
class Comparison:
  """What `compare` found: leaves only one side has, and leaves whose values differ."""

  missing: list[str]  # in B, not made from A
  extra: list[str]  # in A, used by nothing in B
  differing: list[dict] = dataclasses.field(default_factory=list)
  compared: int = 0
  casts: list[str] = dataclasses.field(default_factory=list)
  pairs: list[tuple[str, tuple[str, ...]]] = dataclasses.field(default_factory=list)  # B path, A's stored names

  @property
  def equal(self) -> bool:
    return not (self.missing or self.extra or self.differing)


def compare(
  a: source_lib.Checkpoint,
  b: source_lib.Checkpoint,
  *,
  rules=None,
  stacks=None,
  rtol: float = 0.0,
  atol: float = 0.0,
  batch_bytes: int = DEFAULT_BATCH_BYTES,
  on_done: Callable[[int, int], None] = lambda n, k: None,
) -> Comparison:
  """Compares A, read as B's tree through the same plan as a restore, with B, leaf by leaf, a batch at a time.

  A leaf matches when every element satisfies |a - b| <= atol + rtol * |b|
  (NaN matching NaN); with the defaults, bit for bit. Leaves are read onto one
  device, `batch_bytes` of them (from each side) at a time.
  """
  plan = prepare_lib.prepare(a, b, options_lib.RestoreOptions(rules=rules, stacks=stacks, partial=True)).plan
  own = prepare_lib.prepare(b, b).plan  # B read as itself
  one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  plan, own = with_shardings(plan, lambda t: one), with_shardings(own, lambda t: one)
  own_reads = {r.target.path: r for r in own.reads}
  result = Comparison(missing=[layout.render(t.path) for t in plan.kept], extra=[s.name for s in plan.unused])
  for r in plan.reads:
    result.pairs.append((layout.render(r.target.path), tuple(getattr(x, 'name', str(x)) for x in r.sources)))
    if any(isinstance(op, ops.Cast) for op in r.transform):
      result.casts.append(
        f'{layout.render(r.target.path)}: A holds {np.dtype(r.sources[0].dtype).name}, compared as'
        f' {np.dtype(r.target.dtype).name}'
      )
  for batch in batches(plan.reads, batch_bytes):
    mine = read_lib.execute(dataclasses.replace(plan, reads=tuple(batch), kept=()), a)
    theirs = read_lib.execute(
      dataclasses.replace(own, reads=tuple(own_reads[r.target.path] for r in batch), kept=()), b
    )
    for r in batch:
      x, y = np.asarray(mine.pop(r.target.path)), np.asarray(theirs.pop(r.target.path))
      diff = _difference(x, y, rtol, atol)
      if diff is not None:
        result.differing.append({'path': layout.render(r.target.path), **diff})
    result.compared += len(batch)
    on_done(sum(plans.nbytes(r.target.shape, r.target.dtype) for r in batch), len(batch))
  return result


def _difference(x: np.ndarray, y: np.ndarray, rtol: float, atol: float) -> dict | None:
  """None when x matches y; else the largest absolute and relative differences and how many elements differ."""
  if not (rtol or atol):  # bit for bit: -0.0 differs from 0.0, a NaN matches only the same NaN
    bits = lambda v: np.ascontiguousarray(np.atleast_1d(v)).view(np.uint8).reshape(np.atleast_1d(v).shape + (-1,))
    bad = (bits(x) != bits(y)).any(axis=-1)
  else:
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    with np.errstate(invalid='ignore'):
      bad = ~((np.abs(x64 - y64) <= atol + rtol * np.abs(y64)) | (np.isnan(x64) & np.isnan(y64)) | (x64 == y64))
  if not bad.any():
    return None
  x64, y64 = np.atleast_1d(x).astype(np.float64), np.atleast_1d(y).astype(np.float64)
  bad = bad.reshape(x64.shape)
  with np.errstate(invalid='ignore', divide='ignore'):
    absolute = np.abs(x64 - y64)[bad]
    relative = absolute / np.abs(y64[bad])
  return {
    'elements': int(bad.sum()),
    'of': int(bad.size),
    'max_abs': float(np.nanmax(absolute)),
    'max_rel': float(np.nanmax(relative)) if np.isfinite(relative).any() else float('inf'),
  }
