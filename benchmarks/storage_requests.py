"""Requests to an object store per array: our restore, plan and convert against Orbax's own restore, on gs://.

    python benchmarks/storage_requests.py [--json FILE]

Object stores answer each request in milliseconds, so what a restore costs there is mostly how many requests
it makes. This starts the tests' GCS emulator (tests/object_store.py: fake-gcs-server on 127.0.0.1, which
logs every request it answers), saves restore_bench.py's many-leaf case there (a Linen loop of 64 layers x 9
weights + Adam: 1,733 arrays, one chunk each, as a host saves them) in the Linen layout and, from the same
values, in the NNX unrolled layout, and then, each in a fresh process:

  native    CheckpointManager.restore(StandardRestore) of the NNX-layout checkpoint (the same arrays, no
            conversion: what a restore costs at the least)
  ours      CheckpointManager.restore(LinenCompatRestore) of the Linen checkpoint into the NNX tree
  plan      orbax_linen_nnx.plan() of the same (metadata only)
  convert   orbax-linen-nnx convert --to nnx of the Linen checkpoint to a new gs:// directory

Each reports every request the emulator answered while it ran (TensorStore's arrays and etils/gcsfs's
listings and small files alike) and, of those, TensorStore's own HTTP requests (its counters), and the
requests by what they ask for (`kind`: list, stat, read, write, delete; of which file) from the log.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import statistics
import urllib.parse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / 'tests'))
import restore_bench as rb  # noqa: E402

MODES = ('native', 'ours', 'plan', 'convert')


def what(request: str) -> str:
  """A request to the GCS JSON API as `kind file`: kind from its method and form, file from its object name
  (array data files, `d/<hash>`, as `d/*`; a listing by its prefix)."""
  method, target = request.split(' ', 1)
  url = urllib.parse.urlsplit(target)
  query = urllib.parse.parse_qs(url.query)
  if method in ('POST', 'PUT'):
    kind, name = 'write', query.get('name', [url.path])[0]
  elif method == 'DELETE':
    kind, name = 'delete', url.path
  elif url.path.endswith('/o'):
    kind, name = 'list', query.get('prefix', [''])[0]
  else:
    kind, name = ('read' if query.get('alt') == ['media'] else 'stat'), url.path
  name = urllib.parse.unquote(name.split('/o/', 1)[-1])
  name = re.sub(r'/d/[0-9a-f]{32}$', '/d/*', name)
  parts = [p for p in name.split('/') if p]
  tail = parts[-1] if parts else ''
  if tail.isdigit() or tail.startswith(('loop', 'unrolled', 'converted', 'many')):
    tail = '<dir>'
  return f'{kind} {"d/*" if tail == "*" else tail}'


def build(root: str) -> None:
  import orbax.checkpoint as ocp

  values_of = rb.random_values()
  for layout in ('loop', 'unrolled'):
    with ocp.CheckpointManager(f'{root}/{layout}') as mngr:
      mngr.save(rb.STEP, args=ocp.args.StandardSave(rb.train_state_tree(rb.MANY, values_of, layout)))
      mngr.wait_until_finished()


def one(root: str, mode: str) -> dict:
  """One measurement, in this (fresh) process: wall time and TensorStore's HTTP requests."""
  import jax
  import orbax.checkpoint as ocp
  from etils import epath

  import orbax_linen_nnx

  def http() -> int:
    return rb.counter('/tensorstore/http/request_started')

  nnx_dir = f'{root}/unrolled'
  here = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  meta = ocp.PyTreeCheckpointHandler().metadata(epath.Path(f'{nnx_dir}/{rb.STEP}/default')).tree
  abstract = rb.map_tree(lambda path, m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=here), meta)
  arrays = sum(1 for _ in rb.flat_paths(meta))
  before, start = http(), time.perf_counter()
  if mode == 'native':
    with ocp.CheckpointManager(nnx_dir) as mngr:
      jax.block_until_ready(mngr.restore(rb.STEP, args=ocp.args.StandardRestore(abstract)))
  elif mode == 'ours':
    with ocp.CheckpointManager(f'{root}/loop') as mngr:
      jax.block_until_ready(mngr.restore(rb.STEP, args=orbax_linen_nnx.LinenCompatRestore(abstract)))
  elif mode == 'plan':
    orbax_linen_nnx.plan(f'{root}/loop/{rb.STEP}', abstract)
  else:
    from orbax_linen_nnx.faces import cli

    assert (
      cli.main(['convert', f'{root}/loop/{rb.STEP}', f'{root}/converted-{time.time_ns()}', '--to', 'nnx', '--quiet'])
      == cli.EXIT_OK
    )
  return {'mode': mode, 'wall_s': time.perf_counter() - start, 'tensorstore_http': http() - before, 'arrays': arrays}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--json', type=Path, default=HERE / 'storage_results.json')
  ap.add_argument('--rounds', type=int, default=5, help='rounds of all modes, each in fresh processes')
  ap.add_argument('--one', nargs=2, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.one:
    print(json.dumps(one(*args.one)))
    return
  import object_store

  with tempfile.TemporaryDirectory() as tmp:
    emulator = object_store.GcsEmulator(os.path.join(tmp, 'emulator.log'), log_requests=True)
    try:
      root = os.fspath(emulator.root('many'))
      build(root)
      rows = []
      for round_ in range(args.rounds):
        for mode in MODES:
          before = len(emulator.request_log())
          done = subprocess.run(
            [sys.executable, __file__, '--one', root, mode],
            capture_output=True,
            text=True,
            timeout=900,
            env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
          )
          assert done.returncode == 0, done.stderr[-3000:]
          row = json.loads(done.stdout.strip().splitlines()[-1])
          asked = emulator.request_log()[before:]
          row.update(
            round=round_, requests=len(asked), by_what=dict(sorted(collections.Counter(map(what, asked)).items()))
          )
          rows.append(row)
          print({k: v for k, v in row.items() if k != 'by_what'}, file=sys.stderr, flush=True)
    finally:
      emulator.stop()
  median = {
    mode: {
      k: statistics.median(r[k] for r in rows if r['mode'] == mode) for k in ('requests', 'tensorstore_http', 'wall_s')
    }
    for mode in MODES
  }
  arrays = rows[0]['arrays']
  print(f'medians of {args.rounds} rounds; each row: every round\'s requests')
  print('| mode | requests | per array | TensorStore HTTP | vs native restore | wall s | rounds |')
  print('| --- | ---: | ---: | ---: | ---: | ---: | --- |')
  for mode, m in median.items():
    every = ', '.join(str(r['requests']) for r in rows if r['mode'] == mode)
    print(
      f"| {mode} | {m['requests']:g} | {m['requests'] / arrays:.2f} | {m['tensorstore_http']:g} |"
      f" {m['requests'] - median['native']['requests']:+g} | {m['wall_s']:.2f} | {every} |"
    )
  kinds = sorted({k for r in rows for k in r['by_what']})
  print()
  print('| request (median) | ' + ' | '.join(MODES) + ' |')
  print('| --- |' + ' ---: |' * len(MODES))
  for k in kinds:
    cells = [statistics.median(r['by_what'].get(k, 0) for r in rows if r['mode'] == mode) for mode in MODES]
    print(f'| {k} | ' + ' | '.join(f'{c:g}' for c in cells) + ' |')
  args.json.write_text(json.dumps({'arrays': arrays, 'rounds': args.rounds, 'median': median, 'rows': rows}, indent=1))


if __name__ == '__main__':
  main()
