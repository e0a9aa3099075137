"""A restore's plan as plain data: every target leaf, the stored array(s) it is read from, and how.

A `RestorePlan` is computed from checkpoint metadata and the abstract target
alone, before any array byte is read (`planner.build` makes it). It is plain
data: print it to see what a restore will do, compare it in tests, hand it to
`read.execute` to run it. Every other module imports its types from here.

    >>> print(plan)                                     # doctest: +SKIP
    linen -> nnx: 11 arrays to read, 2 kept as given, 0 unused sources
      model/fc1/kernel (3, 8) float32  <-  params.params.Dense_0.kernel
      optimizer/step () uint32  <-  step  [cast int32 -> uint32]
      kept  model/rngs/default/key  (NNX-only state)
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import warnings
from typing import Any

import numpy as np

from orbax_linen_nnx import layout
from orbax_linen_nnx.planning import ops

Path = layout.Path


def nbytes(shape, dtype) -> int:
  """Bytes of an array of `shape` and `dtype`."""
  return math.prod(shape) * np.dtype(dtype).itemsize


class Sized:
  """`nbytes` and `ndim` from `shape` and `dtype`: what Orbax asks of a leaf it writes as an array."""

  shape: tuple[int, ...]
  dtype: Any

  @property
  def nbytes(self) -> int:
    return nbytes(self.shape, self.dtype)

  @property
  def ndim(self) -> int:
    return len(self.shape)


def fmt(shape, dtype) -> str:
  return f'{tuple(shape)} {np.dtype(dtype).name if is_numpy_dtype(dtype) else dtype}'


def is_numpy_dtype(dtype) -> bool:
  try:
    np.dtype(dtype)
    return True
  except TypeError:
    return False


@dataclasses.dataclass(frozen=True)
class SourceArray:
  """An array in the checkpoint: its tree path, on-disk name, shape and dtype."""

  path: Path
  name: str
  shape: tuple[int, ...]
  dtype: Any
  key_impl: str | None = None  # a typed PRNG key stored as its key data: the key implementation

  def __str__(self) -> str:
    keys = f' ({self.key_impl} key data)' if self.key_impl else ''
    return f"source '{layout.render(self.path)}' {fmt(self.shape, self.dtype)}{keys}"


@dataclasses.dataclass(frozen=True)
class Target:
  """A leaf of the abstract state: what the restore must produce there.

  `variable_type` is the NNX Variable class name when the target is an NNX
  state ('Param', 'BatchStat', 'RngKey', ...), else None.
  """

  path: Path
  shape: tuple[int, ...]
  dtype: Any
  sharding: Any
  variable_type: str | None = None
  key_impl: str | None = None  # a typed PRNG key: read as its key data (shape, dtype), then wrapped

  @property
  def nnx_only(self) -> bool:
    """State Linen never saves (RNG keys and counts)."""
    return self.variable_type in ('RngKey', 'RngCount', 'RngState') or layout.is_rng_path(self.path)

  def __str__(self) -> str:
    keys = f' ({self.key_impl} key data)' if self.key_impl else ''
    return f"target '{layout.render(self.path)}' {fmt(self.shape, self.dtype)}{keys}"


def _compact(names: list[str]) -> str:
  """'a.layers_0.k', ..., 'a.layers_7.k' -> 'a.layers_{0..7}.k' (the plan stays readable)."""
  parts = [re.split(r'(\d+)', n) for n in names]
  if len(names) > 2 and len({len(p) for p in parts}) == 1:
    differ = [i for i in range(len(parts[0])) if len({p[i] for p in parts}) > 1]
    if len(differ) == 1 and [p[differ[0]] for p in parts] == [str(i) for i in range(len(names))]:
      head = parts[0][: differ[0]]
      return ''.join(head) + f'{{0..{len(names) - 1}}}' + ''.join(parts[0][differ[0] + 1 :])
  return ', '.join(names)


@dataclasses.dataclass(frozen=True)
class LeafRead:
  """One target leaf, the source array(s) it comes from and how it is transformed.

  `sources` are stored arrays (`SourceArray`) or arrays rules make from them
  (`ops.Derived`). `transform` is applied in order to lazy views of the
  sources; empty means the target is the source as it is. `rules` names the
  rules that produced the sources.
  """

  target: Target
  sources: tuple[Any, ...]
  transform: tuple[Any, ...] = ()
  rules: tuple[str, ...] = ()

  def expression(self) -> Any:
    """The sources with the transform applied: one tree of ops (`ops.Derived`) over stored arrays."""
    args = list(self.sources)
    for op in self.transform:
      args = [ops.derive(op, args, self.target.path)]
    (expr,) = args
    return expr

  def __str__(self) -> str:
    names = _compact([s.name for s in self.sources])
    ops = f"  [{'; '.join(str(t) for t in self.transform)}]" if self.transform else ''
    made = f"  (by {', '.join(self.rules)})" if self.rules else ''
    keys = f'  (as {self.target.key_impl} key data)' if self.target.key_impl else ''
    return (
      f'{layout.render(self.target.path)} {fmt(self.target.shape, self.target.dtype)}  <-  {names}{ops}{made}{keys}'
    )


def size_text(n: float) -> str:
  """Bytes as people read them: '512 B', '3.0 MiB', '1.2 TiB'."""
  for unit in ('B', 'KiB', 'MiB', 'GiB', 'TiB'):
    if n < 1024 or unit == 'TiB':
      return f'{n:.0f} {unit}' if unit == 'B' else f'{n:.1f} {unit}'
    n /= 1024
  return str(n)


@dataclasses.dataclass(frozen=True)
class LeafCost:
  """One target leaf's reads on one process: stored bytes decoded for it and the stored bytes it needs."""

  path: str
  decoded: int
  needed: int
  largest_chunk: int  # the largest stored chunk it decodes
  largest_need: int  # the largest box of one stored array one of its slices needs

  @property
  def over_read(self) -> float:
    return self.decoded / self.needed if self.needed else 1.0


# A stored chunk this many times the largest box any slice of the process needs from it, and at least
# BIG_CHUNK_BYTES, is named in the plan: typically a published array stored as one chunk, read by many devices.
BIG_CHUNK_FACTOR, BIG_CHUNK_BYTES = 8, 16 * 2**20


@dataclasses.dataclass(frozen=True)
class ProcessCost:
  """What one process of a restore reads, decodes, places and holds (from metadata; see cost.py).

  Attributes:
    read_bytes: stored bytes it decodes (each chunk once: chunks x chunk bytes).
    needed_bytes: stored bytes its slices need; read_bytes / needed_bytes is the over-read.
    chunks: stored chunks it decodes.
    placed_bytes: target bytes placed on its devices, every device's copy counted.
    device_max_bytes: target bytes on its most loaded device.
    budget_bytes, largest_chunk_bytes: the read engine holds at most the budget of decoded bytes plus the
      largest chunk it decodes (`host_bound_bytes`), besides the process's own baseline.
    leaves: per target leaf, most over-read first.
    chunk_ids: with `chunks_of`, the chunks it decodes by stored array.
  """

  process: int
  devices: int
  read_bytes: int
  needed_bytes: int
  chunks: int
  placed_bytes: int
  device_max_bytes: int
  budget_bytes: int
  largest_chunk_bytes: int
  leaves: tuple[LeafCost, ...] = ()
  chunk_ids: dict | None = None

  @property
  def over_read(self) -> float:
    return self.read_bytes / self.needed_bytes if self.needed_bytes else 1.0

  @property
  def host_bound_bytes(self) -> int:
    return min(self.budget_bytes, self.read_bytes) + self.largest_chunk_bytes

  def big_chunks(self) -> list[LeafCost]:
    return [
      c
      for c in self.leaves
      if c.largest_chunk >= BIG_CHUNK_BYTES and c.largest_chunk >= BIG_CHUNK_FACTOR * c.largest_need
    ]

  def lines(self) -> list[str]:
    z = size_text
    out = [
      f'process {self.process} ({self.devices} devices): reads {z(self.read_bytes)} in {self.chunks:,}'
      f' chunks for {z(self.needed_bytes)} needed (over-read {self.over_read:.2f}x); places'
      f' {z(self.placed_bytes)}, at most {z(self.device_max_bytes)} on one device; host memory of the read'
      f' at most {z(self.host_bound_bytes)} (budget {z(self.budget_bytes)} + largest chunk'
      f' {z(self.largest_chunk_bytes)})'
    ]
    worst = [c for c in self.leaves[:3] if c.decoded > c.needed]
    if worst and self.over_read > 1.05:
      out.append(
        '  over-read mostly from ' + ', '.join(f'{c.path} ({z(c.decoded)} decoded for {z(c.needed)})' for c in worst)
      )
    out += [
      f'  {c.path}: stored chunks of {z(c.largest_chunk)} for slices of at most {z(c.largest_need)}'
      f' (each process decodes whole chunks)'
      for c in self.big_chunks()
    ]
    return out


@dataclasses.dataclass(frozen=True)
class WriteCost:
  """What one process of a save writes, and the device memory its on-device conversions take (cost.py).

  Attributes:
    written_bytes: bytes of the Linen arrays it writes (each distinct shard once, by the process of its first
      device: Orbax's replica 0).
    device_extra_bytes, device_extra_max_bytes: bytes of converted arrays computed on its devices (a reshape,
      PRNG keys), held beside the state until the save has copied them: in all, and on its fullest device.
  """

  process: int
  devices: int
  written_bytes: int
  device_extra_bytes: int = 0
  device_extra_max_bytes: int = 0

  def lines(self) -> list[str]:
    z = size_text
    extra = (
      f'; conversions on its devices hold {z(self.device_extra_bytes)}, up to {z(self.device_extra_max_bytes)}'
      ' on one device, until written'
      if self.device_extra_bytes
      else '; nothing is converted on its devices'
    )
    return [f'process {self.process} ({self.devices} devices): writes {z(self.written_bytes)}{extra}']


@dataclasses.dataclass(frozen=True)
class Cost:
  """Every process's `ProcessCost` for one restore (`simulated`: processes from `processes=`, not devices;
  `caller`: the process that made a real plan, whose cost its printout shows)."""

  processes: tuple[Any, ...]  # every ProcessCost (a restore's) or every WriteCost (a save's)
  simulated: bool = False
  caller: int | None = None

  def of(self, process: int) -> Any:
    for p in self.processes:
      if p.process == process:
        return p
    raise KeyError(f'no process {process} in this plan (processes {[p.process for p in self.processes]})')

  def summary(self) -> dict[str, dict[str, int]]:
    """Max, min and total over processes of each byte count."""
    fields = (
      ('written_bytes', 'device_extra_bytes', 'device_extra_max_bytes')
      if self.processes and isinstance(self.processes[0], WriteCost)
      else ('read_bytes', 'chunks', 'placed_bytes', 'device_max_bytes', 'host_bound_bytes')
    )
    return {
      f: {
        'max': max(getattr(p, f) for p in self.processes),
        'min': min(getattr(p, f) for p in self.processes),
        'total': sum(getattr(p, f) for p in self.processes),
      }
      for f in fields
    }

  def lines(self, process: int | None = None, every: bool = False) -> list[str]:
    if not self.processes:
      return []
    if len(self.processes) == 1 or (process is not None and not every):
      return self.of(process if process is not None else self.processes[0].process).lines()
    z, s = size_text, self.summary()
    simulated = " (simulated)" if self.simulated else ""
    if 'written_bytes' in s:
      w = s['written_bytes']
      out = [
        f'{len(self.processes)} processes{simulated}: write {z(w["total"])} in all, {z(w["min"])}-{z(w["max"])}'
        f' a process; conversions on devices hold up to {z(s["device_extra_max_bytes"]["max"])} on one'
      ]
      most = 'written_bytes'
    else:
      out = [
        f'{len(self.processes)} processes{simulated}: reads'
        f' {z(s["read_bytes"]["total"])} in all, {z(s["read_bytes"]["min"])}-{z(s["read_bytes"]["max"])} a'
        f' process; devices hold up to {z(s["device_max_bytes"]["max"])}; host memory of the read up to'
        f' {z(s["host_bound_bytes"]["max"])} a process'
      ]
      most = 'read_bytes'
    shown = self.processes if every else [max(self.processes, key=lambda p: getattr(p, most))]
    if not every:
      out.append('most read:' if most == 'read_bytes' else 'most written:')
    return out + [f'  {line}' for p in shown for line in p.lines()]


@dataclasses.dataclass(frozen=True)
class RestorePlan:
  """What a restore will read, keep and leave out, decided before any read.

  Attributes:
    source_layout: 'linen' or 'nnx', the checkpoint's layout.
    target_layout: 'linen' or 'nnx', the abstract state's layout.
    reads: one `LeafRead` per target leaf that is restored from the checkpoint.
    kept: target leaves left as given in the abstract state (NNX-only state such
      as RNG keys; with `partial=True`, also targets with no source).
    unused: source arrays nothing reads (only possible with `partial=True`).
    skipped: NNX-only source arrays (RNG state) that a Linen target has no place
      for; reported, never an error.
    dropped: (source array, rule) for every source a `drop` rule left out.
    rules_matched: (rule, model paths it matched) for every rule that matched.
    notes: what the planner inferred that the caller did not state.
    cost: what each process will read, decode, place and hold (`Cost`), or None.
    inferred_renames: with rules='auto', the renames inferred from the two trees
      ({linen module: nnx module}, see `rules.as_python`).
  """

  source_layout: str
  target_layout: str
  reads: tuple[LeafRead, ...]
  kept: tuple[Target, ...] = ()
  unused: tuple[SourceArray, ...] = ()
  skipped: tuple[SourceArray, ...] = ()
  dropped: tuple[tuple[SourceArray, str], ...] = ()
  rules_matched: tuple[tuple[str, tuple[str, ...]], ...] = ()
  notes: tuple[str, ...] = ()
  cost: Cost | None = None
  inferred_renames: dict = dataclasses.field(default_factory=dict, compare=False)

  def __str__(self) -> str:
    lines = [
      f'{self.source_layout} -> {self.target_layout}: {len(self.reads)} arrays to'
      f' read, {len(self.kept)} kept as given, {len(self.unused)} unused sources,'
      f' {len(self.skipped)} NNX-only sources skipped'
      + (f', {len(self.dropped)} dropped by rules' if self.dropped else '')
    ]
    lines += [f'  {r}' for r in self.reads]
    lines += [
      f"  kept    {layout.render(t.path)} {fmt(t.shape, t.dtype)}  ({'NNX-only state' if t.nnx_only else 'no source'})"
      for t in self.kept
    ]
    lines += [f'  unused  {s.name} {fmt(s.shape, s.dtype)}' for s in self.unused]
    lines += [f'  skipped {s.name} {fmt(s.shape, s.dtype)} (NNX-only)' for s in self.skipped]
    lines += [f'  dropped {s.name} {fmt(s.shape, s.dtype)} (by {rule})' for s, rule in self.dropped]
    for rule, paths in self.rules_matched:
      shown = ', '.join(paths[:3]) + (f', ... ({len(paths)} in all)' if len(paths) > 3 else '')
      lines.append(f'  rule    {rule} matched {shown}')
    lines += [f'  note    {n}' for n in self.notes]
    if self.cost is not None:
      # A real restore: the calling process's own cost; simulated: all processes together, the most read.
      lines += [f'  cost    {line}' for line in self.cost.lines(process=self.cost.caller)]
    return '\n'.join(lines)

  def as_json(self) -> dict[str, Any]:
    """The plan as JSON-ready data (what `orbax-linen-nnx plan --json` prints). Schema, every key always there:

    `source_layout`, `target_layout`: 'linen' or 'nnx'; `reads`: [{`target`: path, `shape`: [int],
    `dtype`: str, `sources`: [stored array names], `ops`: [str], `rules`: [str]}]; `kept`: [{`target`, `shape`,
    `dtype`, `why`: 'nnx-only' or 'no source'}]; `unused`, `skipped`: [{`source`, `shape`, `dtype`}];
    `dropped`: [{`source`, `rule`}]; `notes`: [str]; `inferred_renames`: {linen module: nnx module};
    `cost`: null, or {`simulated`: bool, `processes`: int, `summary`: {field: {`max`, `min`, `total`}}}.
    """
    leaf = lambda key, path, shape, dtype: {key: path, 'shape': list(shape), 'dtype': np.dtype(dtype).name}
    return {
      'source_layout': self.source_layout,
      'target_layout': self.target_layout,
      'reads': [
        {
          **leaf('target', layout.render(r.target.path), r.target.shape, r.target.dtype),
          'sources': [x.name for src in r.sources for x in ops.stored_leaves(src)],
          'ops': [str(t) for t in r.transform],
          'rules': list(r.rules),
        }
        for r in self.reads
      ],
      'kept': [
        {**leaf('target', layout.render(t.path), t.shape, t.dtype), 'why': 'nnx-only' if t.nnx_only else 'no source'}
        for t in self.kept
      ],
      'unused': [leaf('source', x.name, x.shape, x.dtype) for x in self.unused],
      'skipped': [leaf('source', x.name, x.shape, x.dtype) for x in self.skipped],
      'dropped': [{'source': x.name, 'rule': rule} for x, rule in self.dropped],
      'notes': list(self.notes),
      'inferred_renames': dict(self.inferred_renames),
      'cost': None
      if self.cost is None
      else {'simulated': self.cost.simulated, 'processes': len(self.cost.processes), 'summary': self.cost.summary()},
    }

  def read_for(self, path: str | Path) -> LeafRead:
    """The `LeafRead` of a target path ('model/fc1/kernel' or a tuple)."""
    if isinstance(path, str):
      path = tuple(p for p in path.split('/') if p)
    for r in self.reads:
      if r.target.path == tuple(path):
        return r
    raise KeyError(f'no read planned for target {layout.render(path)!r}')


@dataclasses.dataclass(frozen=True)
class Fix:
  """One fix a `PlanError` proposes, as data, so each face can say it in its own language.

  `python` is how the API says it (`rules={...}`, `partial=True`). `kind`
  says what it is: 'rename' (`rules`: the whole rules= value that works, or
  None where the given rules are no mapping and `renames` is to be added to
  them; `auto`: whether `rules='auto'` infers exactly these renames),
  'auto_rename' (`renames`: the rename to state before 'auto') or 'partial'.
  """

  kind: str
  python: str
  renames: dict = dataclasses.field(default_factory=dict)
  rules: Any = None
  auto: bool = False
  notes: tuple[str, ...] = ()


class LeafProblem(str):
  """One leaf's problem, as its line reads, with what it is about: `kind` 'missing' (a target with no source),
  'unused' (a source no target reads) or 'shape' (shapes differ); `meaning` the leaf's `layout.Meaning`;
  `array` the `Target` or `SourceArray`. Errors group these by module (see `diagnose.error`)."""

  kind: str
  meaning: Any
  array: Any

  def __new__(cls, text: str, kind: str, meaning: Any, array: Any) -> 'LeafProblem':
    out = super().__new__(cls, text)
    out.kind, out.meaning, out.array = kind, meaning, array
    return out


class PlanError(ValueError):
  """A restore that cannot be planned; lists every problem found. Nothing was read.

  `str(error)` says it as the Python API would (the fix first, then the
  problems, one line per module). `fixes` holds the fixes as `Fix` data (the
  command line says them as flags and files); `details` every problem leaf by
  leaf, where lines were grouped by module.
  """

  def __init__(
    self,
    message: str,
    *,
    head: str = '',
    problems: tuple[str, ...] = (),
    fixes: tuple[Fix, ...] = (),
    details: tuple[str, ...] = (),
  ):
    super().__init__(message)
    self.head, self.problems, self.fixes, self.details = head, tuple(problems), tuple(fixes), tuple(details)

  @classmethod
  def of(cls, head: str, problems, fixes, details=()) -> 'PlanError':
    """The error with its parts; its message says them as the Python API would."""
    shown = cls('', head=head, problems=tuple(problems), fixes=tuple(fixes), details=tuple(details)).text()
    return cls(shown, head=head, problems=tuple(problems), fixes=tuple(fixes), details=tuple(details))

  def text(self, fix_line: str | None = None, verbose: bool = False, cli: bool = False) -> str:
    """The message with `fix_line` in place of the Python fixes (where it has structure) and, with
    `verbose`, every problem leaf by leaf after it; `cli` points at --verbose rather than `details`."""
    if not self.head:
      return str(self)
    fix = self.fix_line() if fix_line is None else fix_line
    lines = [self.head] + ([fix] if fix else []) + [f'  {p}' for p in self.problems]
    if self.details and verbose:
      lines += ['Leaf by leaf:'] + [f'  {d}' for d in self.details]
    elif self.details:
      lines.append(f"({len(self.details)} leaves in all: {'--verbose' if cli else 'PlanError.details'} lists each)")
    return '\n'.join(lines)

  def fix_line(self) -> str:
    """The fixes as the Python API says them."""
    return f"Fix: {'; or '.join(f.python for f in self.fixes)}." if self.fixes else ''


class LinenCompatWarning(UserWarning):
  """A restore or save that went ahead but left something the caller should know of (the plan lists it)."""


def warn(message: str) -> None:
  """A `LinenCompatWarning` attributed to the caller's line: the first frame outside Orbax and this package."""
  level, frame = 2, sys._getframe(1)  # stacklevel 2 is the frame that called warn
  while frame is not None and any(
    f'{os.sep}{pkg}{os.sep}' in frame.f_code.co_filename for pkg in ('orbax', 'orbax_linen_nnx', 'concurrent')
  ):
    level, frame = level + 1, frame.f_back  # type: ignore[assignment]
  warnings.warn(f'orbax_linen_nnx: {message}', LinenCompatWarning, stacklevel=level)
