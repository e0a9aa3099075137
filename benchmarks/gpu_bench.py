"""Restore, convert and save against native Orbax on one accelerator, in one command of under ten minutes.

    python benchmarks/gpu_bench.py [--size-mb 1000] [--runs 3] [--json benchmarks/gpu_results.json]

For the machine the `device` tool lends (one GPU, 16 cores). It builds
restore_bench.py's decoder (float32 params + Adam mu and nu, 8 layers; saved
from 8 CPU devices as fsdp x tp shards, the chunks of a sharded run) in the
Linen loop, NNX unrolled and NNX stacked layouts, then, each run in a fresh
process, the two sides alternating, medians of same-round pairs:

  restore/plain   LinenCompatRestore loop -> unrolled    StandardRestore of the NNX unrolled tree
  restore/stack   LinenCompatRestore loop -> stacked     StandardRestore of the NNX stacked tree
  save/unstack    LinenCompatSave stacked -> loop        StandardSave of the stacked state
  save/move       LinenCompatSave stacked -> nn.scan     StandardSave of the stacked state
  convert/stack   orbax-linen-nnx convert loop -> stack  the naive converter (whole tree on the host)

Restores and saves put the state on every local accelerator (a (1, n) fsdp x
tp mesh); each run reports its wall time, peak host RSS and the device's peak
memory in use (`memory_stats`). On a machine without an accelerator it stops
unless --allow-cpu (a check of the script itself, at a small --size-mb).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import restore_bench as rb  # noqa: E402

CELLS = ('restore/plain', 'restore/stack', 'save/unstack', 'save/move', 'convert/stack')


def run(root: Path, cell: str, mode: str, env: dict) -> dict:
  face, what = cell.split('/')
  if face == 'convert':
    import convert_bench

    return convert_bench.run_one(root, f'shards/{what}', 'ours' if mode == 'ours' else 'naive')
  if face == 'restore':
    cmd = [str(HERE / 'restore_bench.py'), '--one', mode, '--cell', what, '--chunking', 'shards', '--root', str(root)]
  else:
    cmd = [str(HERE / 'save_bench.py'), '--one', str(root), what, mode]
  done = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=600, env=env)
  if done.returncode:
    raise RuntimeError(f'{cell}/{mode} failed:\n{done.stderr[-3000:]}')
  return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--size-mb', type=float, default=1000)
  ap.add_argument('--runs', type=int, default=3)
  ap.add_argument('--cells', default=','.join(CELLS))
  ap.add_argument('--cache', type=Path, default=Path.home() / '.cache' / 'orbax_linen_nnx_bench')
  ap.add_argument('--json', type=Path, default=HERE / 'gpu_results.json')
  ap.add_argument('--allow-cpu', action='store_true', help='run on CPU devices (a check of this script)')
  a = ap.parse_args(argv)
  import jax

  jax.config.update('jax_num_cpu_devices', 8)  # the build saves from 8 CPU devices on any machine
  devices = jax.local_devices()
  if devices[0].platform == 'cpu' and not a.allow_cpu:
    sys.exit('no accelerator here: this benchmark is for a GPU or TPU machine (--allow-cpu to check the script)')
  # The children see every local accelerator as one (1, n) mesh; on CPU, 8 devices as a (2, 4) one.
  env = {**os.environ, 'BENCH_MESH': '2,4' if devices[0].platform == 'cpu' else f'1,{len(devices)}'}
  started = time.perf_counter()
  dm = rb.dims(a.size_mb)
  root = rb.build(a.cache, dm, f'decoder_D{dm["D"]}_L8_gpu', chunkings=('shards',), layouts=rb.LAYOUTS)
  cells = a.cells.split(',')
  pairs: dict[str, list] = {c: [] for c in cells}
  for r in range(a.runs):
    for c in cells:
      ref = 'naive' if c.startswith('convert') else 'native'
      order = (ref, 'ours') if r % 2 == 0 else ('ours', ref)
      got = {m: run(root, c, m, env) for m in order}
      pairs[c].append({'round': r, 'reference': got[ref], 'ours': got['ours']})
    print(f'round {r + 1}/{a.runs} done ({time.perf_counter() - started:.0f} s)', file=sys.stderr, flush=True)
  result = {'device': str(devices[0].device_kind), 'devices': len(devices), 'dims': dm, 'runs': a.runs, 'cells': {}}
  print(f'\n{result["device"]} x {len(devices)}; decoder D={dm["D"]}; {a.runs} rounds; medians of same-round pairs')
  print('| cell | reference s | ours s | ours/reference time | every pair | device peak GiB reference / ours |')
  print('| --- | ---: | ---: | ---: | --- | --- |')
  for c, ps in pairs.items():
    ratios = [p['ours']['wall_s'] / p['reference']['wall_s'] for p in ps]
    peak = lambda side: statistics.median((p[side].get('device_peak_bytes') or 0) / 2**30 for p in ps)
    result['cells'][c] = {
      'reference_s': statistics.median(p['reference']['wall_s'] for p in ps),
      'ours_s': statistics.median(p['ours']['wall_s'] for p in ps),
      'time_ratio': statistics.median(ratios),
      'time_ratios': ratios,
      'device_peak_gib': {'reference': peak('reference'), 'ours': peak('ours')},
      'pairs': ps,
    }
    s = result['cells'][c]
    print(
      f"| {c} | {s['reference_s']:.2f} | {s['ours_s']:.2f} | {s['time_ratio']:.2f}"
      f" | {', '.join(f'{x:.2f}' for x in ratios)} | {peak('reference'):.2f} / {peak('ours'):.2f} |"
    )
  result['total_s'] = time.perf_counter() - started
  a.json.write_text(json.dumps(result, indent=1))


if __name__ == '__main__':
  main()
