"""What a checkpoint holds, with no model code: layout, step, optimizer states, layer stacks, arrays.

`orbax-linen-nnx inspect` prints `render_inspection(inspect(ckpt))`; `--json`
prints `inspect(ckpt)` itself. Reads metadata and one scalar (the step).

    info = inspect(source.open_checkpoint('ckpts/linen/100'))
"""

from __future__ import annotations

import collections

import numpy as np

from orbax_linen_nnx import layout
from orbax_linen_nnx.planning import plans
from orbax_linen_nnx.engine import source as source_lib
from orbax_linen_nnx.planning import stacks as stacks_lib


def step_of(ckpt: source_lib.Checkpoint) -> int | None:
  """The training step: the stored step counter, else the step directory's name."""
  for a in ckpt.arrays:
    if a.path in (('step',), ('optimizer', 'step', 'value'), ('optimizer', 'step')) and not a.shape:
      return int(ckpt.stores[a.name].read().result())
  name = ckpt.directory.parent.name
  return int(name) if name.isdigit() else None


def stacks_found(ckpt: source_lib.Checkpoint) -> list[dict]:
  """Layer stacks the checkpoint's model holds: per-layer modules and stacked ones (see `stacks.found_in`)."""
  described = layout.describe([a.path for a in ckpt.arrays], ckpt.layout)
  return stacks_lib.found_in(
    {
      l.meaning.param: tuple(a.shape)
      for a, l in zip(ckpt.arrays, described)
      if l.meaning.section == ('model',) and l.meaning.param
    },
    ckpt.layout,
  )


def inspect(ckpt: source_lib.Checkpoint) -> dict:
  """What a checkpoint holds, as JSON-ready data: layout, step, optimizer, stacks, arrays."""
  kind = ckpt.layout
  described = layout.describe([a.path for a in ckpt.arrays], kind)
  if kind == layout.LINEN and ckpt.sidecar:
    kind = "linen (NNX-only state beside it, in the item's nnx_aux/: LinenCompatSave)"
  elif kind == layout.LINEN and any(l.collection == layout.NNX_AUX for l in described):
    kind = 'linen (MaxText, NNX state under nnx_aux)'
  optimizer: dict[str, list[str]] = collections.defaultdict(list)
  for l in described:
    if l.meaning.section[:1] == ('opt_state',):
      entry = '/'.join(l.meaning.section[1:-1]) or '-'
      what = l.meaning.section[-1] + (' (mirrors the params)' if l.meaning.param else '')
      if what not in optimizer[entry]:
        optimizer[entry].append(what)
  arrays = []
  for a in ckpt.arrays:
    chunk = ckpt.stores[a.name].chunk_layout.read_chunk.shape
    arrays.append(
      {
        'path': layout.render(a.path),
        'shape': list(a.shape),
        'dtype': np.dtype(a.dtype).name,
        'chunk': list(chunk or ()),
        'bytes': plans.nbytes(a.shape, a.dtype),
        'stored_as': a.name,
      }
    )
  return {
    'directory': str(ckpt.directory),
    'layout': kind,
    'step': step_of(ckpt),
    'optimizer': {k: v for k, v in sorted(optimizer.items())},
    'stacks': stacks_found(ckpt),
    'arrays': arrays,
    'total_bytes': sum(x['bytes'] for x in arrays),
  }


def size_text(n: float) -> str:
  for unit in ('B', 'KiB', 'MiB', 'GiB'):
    if n < 1024 or unit == 'GiB':
      return f'{n:.0f} {unit}' if unit == 'B' else f'{n:.1f} {unit}'
    n /= 1024
  return str(n)


def render_inspection(info: dict, detail: str = 'tree') -> str:
  """The `inspect` report as text: a header, then (`detail` 'tree' or 'stored', which adds each array's
  stored name) the array tree; 'header' stops after the header."""
  lines = [f"{info['directory']}", f"  layout     {info['layout']}", f"  step       {info['step']}"]
  if info['optimizer']:
    lines += ['  optimizer  opt_state/' + k + ': ' + ', '.join(v) for k, v in info['optimizer'].items()]
  for s in info['stacks']:
    if s['kind'] == 'per-layer':
      lines.append(f"  stack      {s['root']}: {s['layers']} layers, one module each")
    elif len(s['layer_axis']) == 1:
      lines.append(
        f"  stack      {s['root']}: {s['layers'][0]} layers, stacked at axis {s['layer_axis'][0]} (from shapes)"
      )
    else:
      either = ' or '.join(f'{a} ({n} layers)' for a, n in zip(s['layer_axis'], s['layers']))
      lines.append(f"  stack      {s['root']}: stacked at axis {either}: shapes cannot tell, --stacks can")
  lines.append(f"  arrays     {len(info['arrays'])}, {size_text(info['total_bytes'])}")
  if detail == 'header':
    return '\n'.join(lines)
  shown: list[str] = []
  for a in info['arrays']:
    parts = a['path'].split('/')
    if len(parts) > 1 and parts[-1] == 'value':  # an NNX Variable's node: shown with its name
      parts = parts[:-2] + ['/'.join(parts[-2:])]
    common = 0
    while common < min(len(shown), len(parts) - 1) and shown[common] == parts[common]:
      common += 1
    for depth in range(common, len(parts) - 1):
      lines.append('  ' + '  ' * depth + parts[depth] + '/')
    shown = parts[:-1]
    lines.append(
      f"  {'  ' * (len(parts) - 1)}{parts[-1]}  {tuple(a['shape'])} {a['dtype']}"
      f"  chunk {tuple(a['chunk'])}  {size_text(a['bytes'])}"
      + (f"  stored as {a['stored_as']}" if detail == 'stored' else '')
    )
  return '\n'.join(lines)
