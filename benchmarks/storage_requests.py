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
listings and small files alike) and, of those, TensorStore's own HTTP requests (its counters).
"""

from __future__ import annotations

import argparse
import json
import os
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
    from orbax_linen_nnx import cli

    assert cli.main(['convert', f'{root}/loop/{rb.STEP}', f'{root}/converted-{time.time_ns()}', '--to', 'nnx',
                     '--quiet']) == cli.EXIT_OK
  return {'mode': mode, 'wall_s': time.perf_counter() - start, 'tensorstore_http': http() - before,
          'arrays': arrays}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--json', type=Path, default=HERE / 'storage_results.json')
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
      for mode in MODES:
        before = emulator.requests()
        done = subprocess.run([sys.executable, __file__, '--one', root, mode], capture_output=True, text=True,
                              timeout=900, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
        assert done.returncode == 0, done.stderr[-3000:]
        row = json.loads(done.stdout.strip().splitlines()[-1])
        row['requests'] = emulator.requests() - before
        rows.append(row)
        print(row, file=sys.stderr, flush=True)
    finally:
      emulator.stop()
  native = next(r for r in rows if r['mode'] == 'native')
  print('| mode | requests | per array | TensorStore HTTP | vs native restore | wall s |')
  print('| --- | ---: | ---: | ---: | ---: | ---: |')
  for r in rows:
    print(f"| {r['mode']} | {r['requests']} | {r['requests'] / r['arrays']:.2f} | {r['tensorstore_http']} |"
          f" {r['requests'] - native['requests']:+d} | {r['wall_s']:.2f} |")
  args.json.write_text(json.dumps({'arrays': native['arrays'], 'rows': rows}, indent=1))


if __name__ == '__main__':
  main()
