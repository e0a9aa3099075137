"""What a restore will cost on every process, from the plan and the stored chunk grids alone.

The read engine (read.py) decodes each stored chunk under a process's slices
once, and holds at most its budget of decoded bytes plus one chunk. So what
each process reads, decodes, places and holds follows from three things known
before any read: each target's sharding (which device holds which box), the
plan's expression for each target (which box of which stored array a box of
the target needs: `ops.needed`, the engine's own inputs) and each stored
array's chunk grid. Nothing here needs the devices to exist: a sharding over a
`jax.sharding.AbstractMesh` of a pod is placed on simulated processes.

Which process holds which device: on a real mesh, each device's own
`process_index`. Simulated (`processes=N`, or any AbstractMesh), the devices of
the mesh in its row-major order are split into N equal consecutive runs, as
`jax.make_mesh` orders them where `jax.devices()` lists each process's devices
together (GPU clusters, CPU processes, a TPU pod sliced by host along the
mesh's leading axes); `device_process` gives any other map, one process index
per mesh position (row-major).
"""

from __future__ import annotations

import collections
from typing import Any, Sequence

import jax
import numpy as np

from orbax_linen_nnx.planning import ops
from orbax_linen_nnx.planning import grid as grid_lib
from orbax_linen_nnx.planning import plans

Box = tuple[tuple[int, int], ...]


def _axes(entry) -> tuple[str, ...]:
  if entry is None or entry is jax.sharding.PartitionSpec.UNCONSTRAINED:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def _mesh_shape(mesh) -> dict[str, int]:
  return dict(zip(mesh.axis_names, mesh.axis_sizes))


def named_boxes(sharding: jax.sharding.NamedSharding, shape: Sequence[int]) -> list[Box]:
  """The box each mesh position (row-major) holds, as JAX places a NamedSharding: along each dimension,
  the blocks of ceil(size / n) over the mesh axes the spec names there (the first axis slowest)."""
  sizes = _mesh_shape(sharding.mesh)
  names = list(sizes)
  spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
  per_dim = [_axes(e) for e in spec]
  out = []
  for position in np.ndindex(*sizes.values()):
    at = dict(zip(names, position))
    box = []
    for n, axes in zip(shape, per_dim):
      blocks, block = 1, 0
      for a in axes:
        blocks, block = blocks * sizes[a], block * sizes[a] + at[a]
      step = -(-n // blocks)
      lo = min(block * step, n)
      box.append((lo, min(lo + step, n)))
    out.append(tuple(box))
  return out


def _replicated_along(sharding, axis: str | None) -> bool:
  if axis is None or not isinstance(sharding, jax.sharding.NamedSharding):
    return False
  sizes = _mesh_shape(sharding.mesh)
  return axis in sizes and sizes[axis] > 1 and axis not in {a for e in sharding.spec for a in _axes(e)}


class Topology:
  """Which process holds each device of a sharding: real (`process_index`) or simulated."""

  def __init__(
    self, processes: int | None = None, device_process: Sequence[int] | None = None, only: int | None = None
  ):
    if processes is not None and processes < 1:
      raise ValueError(f'processes must be at least 1, got {processes}')
    if device_process is not None:
      device_process = tuple(int(p) for p in device_process)
      processes = max(processes or 0, max(device_process) + 1)
    self.processes, self.device_process = processes, device_process
    self.simulated = processes is not None
    self.only = only  # the one process whose cost is wanted (a real restore's own), or None: all

  def placements(
    self, sharding, shape: Sequence[int], replica_axis: str | None = None
  ) -> list[tuple[int, Any, Box, bool]]:
    """(process, device key, box, reads from storage) for every device the sharding places the leaf on."""
    shape = tuple(shape)
    abstract = isinstance(sharding, jax.sharding.NamedSharding) and isinstance(sharding.mesh, jax.sharding.AbstractMesh)
    if isinstance(sharding, jax.sharding.NamedSharding) and (abstract or self.simulated):
      boxes = named_boxes(sharding, shape)
      process_of = self._process_of(len(boxes))
      readers = None
      if _replicated_along(sharding, replica_axis):
        sizes = _mesh_shape(sharding.mesh)
        at = list(sizes).index(replica_axis)  # type: ignore[arg-type]  # replicated along it: an axis
        readers = {i for i, pos in enumerate(np.ndindex(*sizes.values())) if pos[at] == 0}
      return [(process_of(i), i, box, readers is None or i in readers) for i, box in enumerate(boxes)]
    indices = sharding.devices_indices_map(shape)
    primary = grid_lib.primary_devices(sharding, replica_axis)
    devices = sorted(indices, key=lambda d: d.id)
    process_of = self._process_of(len(devices)) if self.simulated else None
    return [
      (
        process_of(i) if process_of else d.process_index,
        d,
        grid_lib.box_of(indices[d], shape),
        primary is None or d in primary,
      )
      for i, d in enumerate(devices)
    ]

  def _process_of(self, devices: int):
    if self.device_process is not None:
      if len(self.device_process) != devices:
        raise ValueError(f'device_process names {len(self.device_process)} devices; the mesh has {devices}')
      return self.device_process.__getitem__
    n = self.processes or 1
    if devices % n:
      raise ValueError(f'{devices} devices do not split evenly into {n} processes: pass device_process=')
    per = devices // n
    return lambda i: i // per


def _union(chunk_boxes: set) -> set:
  return {c for b in chunk_boxes for c in grid_lib.Grid.chunks(b)}


def estimate(
  plan: plans.RestorePlan,
  grids: dict[str, grid_lib.Grid],
  *,
  topology: Topology | None = None,
  replica_axis: str | None = None,
  budget_bytes: int | None = None,
  chunks_of: bool = False,
) -> plans.Cost:
  """Every process's reads, decodes, device bytes and host bound for `plan` (see the module docstring).

  `grids`: the chunk grid of every stored array the plan reads. With
  `chunks_of`, each process's cost also lists the chunks it decodes, by
  stored array (for checking against what a restore decodes).
  """
  topology = topology or Topology()
  chunks: dict[int, dict[str, set]] = collections.defaultdict(lambda: collections.defaultdict(set))
  needed: dict[int, int] = collections.defaultdict(int)
  device_bytes: dict[int, dict[Any, int]] = collections.defaultdict(lambda: collections.defaultdict(int))
  placed: dict[int, int] = collections.defaultdict(int)
  per_leaf: dict[int, dict[str, list]] = collections.defaultdict(dict)  # process -> leaf -> [names, need, max]
  memo: dict = {}  # the same box of arrays with the same grid (the layers of a stack): computed once

  def chunked(grid: grid_lib.Grid, box: Box) -> tuple[Box, int]:
    key = (grid.chunk, grid.origin, grid.itemsize, box)
    hit = memo.get(key)
    if hit is None:
      hit = memo[key] = (grid.chunk_box(box), grid.nbytes(box))
    return hit

  for r in plan.reads:
    t = r.target
    expr = r.expression()
    itemsize = np.dtype(t.dtype).itemsize
    leaf = '/'.join(t.path)
    seen: set = set()
    for process, device, box, reads in topology.placements(t.sharding, t.shape, replica_axis):
      if topology.only is not None and process != topology.only:
        continue
      size = grid_lib.box_size(box)
      device_bytes[process][device] += size * itemsize
      placed[process] += size * itemsize
      if not reads or not size or (process, box) in seen:
        continue
      seen.add((process, box))
      mine = per_leaf[process].setdefault(leaf, [set(), 0, 0])
      names, its_chunks = mine[0], chunks[process]
      need = most = 0
      # The boxes of distinct slices are disjoint, and so are the stored boxes every op needs for them.
      for name, stored in ops.needed(expr, box):
        chunk_box, nbytes = chunked(grids[name], stored)
        its_chunks[name].add(chunk_box)
        names.add(name)
        need += nbytes
        most = nbytes if nbytes > most else most
      mine[1] += need
      mine[2] = max(mine[2], most)
      needed[process] += need
  chunk_bytes = {n: g.chunk_nbytes for n, g in grids.items()}
  unions: dict = {}

  def union(grid: grid_lib.Grid, boxes: set) -> int:
    key = frozenset(boxes)
    hit = unions.get(key)
    if hit is None:  # chunk indices: the same for any grid
      hit = unions[key] = grid_lib.union_count(grid, boxes)
    return hit

  processes = sorted(set(device_bytes) | (set(range(topology.processes or 0)) if topology.only is None else set()))
  out = []
  for p in processes:
    counts = {n: union(grids[n], boxes) for n, boxes in chunks[p].items()}
    decoded = {n: c * chunk_bytes[n] for n, c in counts.items()}
    largest = max((chunk_bytes[n] for n in counts), default=0)
    budget = budget_bytes if budget_bytes is not None else grid_lib.default_budget(largest)
    leaves = [
      plans.LeafCost(leaf, sum(decoded[n] for n in names), need, max(chunk_bytes[n] for n in names), most)
      for leaf, (names, need, most) in per_leaf[p].items()
    ]
    out.append(
      plans.ProcessCost(
        process=p,
        devices=len(device_bytes[p]),
        read_bytes=sum(decoded.values()),
        needed_bytes=needed[p],
        chunks=sum(counts.values()),
        placed_bytes=placed[p],
        device_max_bytes=max(device_bytes[p].values(), default=0),
        budget_bytes=budget,
        largest_chunk_bytes=largest,
        leaves=tuple(sorted(leaves, key=lambda c: c.decoded - c.needed, reverse=True)),
        chunk_ids={n: frozenset(_union(b)) for n, b in chunks[p].items()} if chunks_of else None,
      )
    )
  return plans.Cost(
    processes=tuple(out), simulated=topology.simulated, caller=None if topology.simulated else jax.process_index()
  )


def grids_of(plan: plans.RestorePlan, stores: dict) -> dict[str, grid_lib.Grid]:
  """The chunk grid of every stored array the plan reads, from the opened stores."""
  names = {x.name for r in plan.reads for s in r.sources for x in ops.stored_leaves(s)}
  return {n: grid_lib.Grid(stores[n]) for n in names}


# A leaf above max_over_read is named only where it decodes this much more than it needs (a small array in
# one chunk, read in slices, costs nothing worth saying).
OVER_READ_NOTE_BYTES = 8 * 2**20


def problems(
  cost: plans.Cost, *, max_over_read: float | None = None, host_memory_limit_bytes: int | None = None
) -> list[str]:
  """The expensive mistakes the cost shows, one line each, with the fix: a process whose over-read is above
  `max_over_read`, or whose read's host memory bound is above `host_memory_limit_bytes`. Every process's
  (each process of a run sees them all, so all decide alike)."""
  z = plans.size_text
  out = _Alike()
  for p in cost.processes:
    if max_over_read is not None:
      # The process as a whole, or any leaf of it that wastes OVER_READ_NOTE_BYTES or more.
      leaves = [c for c in p.leaves if c.over_read > max_over_read and c.decoded - c.needed >= OVER_READ_NOTE_BYTES]
      if p.over_read > max_over_read or leaves:
        worst = ', '.join(
          f'{c.path} ({z(c.decoded)} decoded for {z(c.needed)}, {c.over_read:.1f}x)'
          for c in (leaves or [c for c in p.leaves if c.decoded > c.needed])[:3]
        )
        out.append(
          p.process,
          f'{{who}} decodes {z(p.read_bytes)} of stored chunks for the {z(p.needed_bytes)}'
          f' its devices need (over-read {p.over_read:.1f}x), above max_over_read={max_over_read:g} for'
          f' {worst}: the stored chunks are much larger than, or cut across, the target\'s shards.'
          ' Fix: shard the target along the dimensions the checkpoint was saved on, or convert the'
          ' checkpoint once (orbax-linen-nnx convert) to chunks that fit the target, or pass a higher'
          ' max_over_read',
        )
    if host_memory_limit_bytes is not None and p.host_bound_bytes > host_memory_limit_bytes:
      if p.largest_chunk_bytes > host_memory_limit_bytes:
        fix = (
          f'one stored chunk alone is {z(p.largest_chunk_bytes)}: convert the checkpoint to smaller chunks'
          ' (orbax-linen-nnx convert), or allow more memory'
        )
      else:
        fix = (
          f'pass read_budget_bytes={max(host_memory_limit_bytes - p.largest_chunk_bytes, 1)} (the limit less'
          ' the largest chunk): the same chunks are read, fewer at a time'
        )
      out.append(
        p.process,
        f'{{who}} may hold {z(p.host_bound_bytes)} on the host while it reads (budget'
        f' {z(p.budget_bytes)} + largest chunk {z(p.largest_chunk_bytes)}), above'
        f' host_memory_limit_bytes={host_memory_limit_bytes} ({z(host_memory_limit_bytes)}). Fix: {fix}',
      )
  return out.lines()


class _Alike:
  """Problem lines of many processes, each said once with every process it holds for."""

  def __init__(self):
    self._who: dict[str, list[int]] = {}

  def append(self, process: int, text: str) -> None:
    self._who.setdefault(text, []).append(process)

  def lines(self) -> list[str]:
    out = []
    for text, who in self._who.items():
      runs: list[str] = []
      start: int | None = who[0]
      for a, b in zip(who, who[1:] + [None]):
        if b != a + 1:
          runs.append(str(start) if start == a else f'{start}-{a}')
          start = b
      out.append(
        text.format(
          who=('process ' if len(who) == 1 else 'processes ') + ', '.join(runs) + ('' if len(who) == 1 else ' each')
        )
      )
    return out


def save_estimate(
  plan: plans.RestorePlan, shardings: dict[str, Any], on_device: set, *, topology: Topology | None = None
) -> plans.Cost:
  """Every process's share of a save in the Linen layout (`plan` from `trees.build_save`), from shardings.

  `shardings`: each NNX array's, by plan name. Orbax writes each distinct
  shard once, from the first device holding it (replica 0): an array saved as
  it is, or a `save.Converted` one written from its NNX shards, costs the
  writing process the bytes of its shards' images. Leaves in `on_device` (a
  reshape, PRNG keys) are computed on the devices first, sharded as their first
  source: each device holds its share of the result beside the state until
  the save has copied it.
  """
  topology = topology or Topology()
  written: dict[int, int] = collections.defaultdict(int)
  extra: dict[int, dict[Any, int]] = collections.defaultdict(lambda: collections.defaultdict(int))
  devices: dict[int, set] = collections.defaultdict(set)
  for r in plan.reads:
    t = r.target
    expr = r.expression()
    itemsize = np.dtype(t.dtype).itemsize
    stored = {x.name: x for x in ops.stored_leaves(expr)}
    computed = t.path in on_device
    for n, src in list(stored.items())[:1] if computed else stored.items():
      ratio = plans.nbytes(t.shape, t.dtype) / max(plans.nbytes(src.shape, src.dtype), 1)
      first: dict[Box, int] = {}
      for process, device, box, _ in topology.placements(shardings[n], src.shape):
        if topology.only is not None and process != topology.only:
          continue
        devices[process].add(device)
        if computed:
          extra[process][device] += int(grid_lib.box_size(box) * np.dtype(src.dtype).itemsize * ratio)
        if box not in first:
          first[box] = process
          written[process] += (
            int(grid_lib.box_size(box) * np.dtype(src.dtype).itemsize * ratio)
            if computed
            else sum(grid_lib.box_size(b) for b in ops.images(expr, n, box)) * itemsize
          )
  processes = sorted(set(devices) | (set(range(topology.processes or 0)) if topology.only is None else set()))
  return plans.Cost(
    processes=tuple(
      plans.WriteCost(
        process=p,
        devices=len(devices[p]),
        written_bytes=written[p],
        device_extra_bytes=sum(extra[p].values()),
        device_extra_max_bytes=max(extra[p].values(), default=0),
      )
      for p in processes
    ),
    simulated=topology.simulated,
    caller=None if topology.simulated else jax.process_index(),
  )
