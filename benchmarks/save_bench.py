"""LinenCompatSave vs native Orbax StandardSave of the same sharded NNX state.

    python benchmarks/save_bench.py [--size-mb 1000] [--runs 3] [--json FILE]

Uses restore_bench.py's cached decoder (about --size-mb of float32 params + Adam
mu and nu, 8 layers; built on first use) in its NNX layouts, restored sharded
fsdp x tp over a (2, 4) mesh of 8 CPU devices, and saves it, in a fresh
process per run:

  native   StandardSave of the NNX tree as it is (the same bytes, no conversion)
  ours     LinenCompatSave to the Linen layout:
             plain    unrolled -> loop       renames only (layers/3 -> layers_3)
             unstack  stacked  -> loop       one array per layer (stacks linen=None)
             move     stacked  -> nn.scan    layer axis 0 -> 1

Each run reports the wall time from `save` to `wait_until_finished` and the
peak RSS above the restored state (on CPU, device buffers are host memory, so
arrays converted on device show there too). Runs are interleaved so that each
ratio is taken within one round.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import restore_bench as rb  # noqa: E402

CELLS = {
  'plain': ('unrolled', None),
  'unstack': ('stacked', {'layers': {'nnx': 0, 'linen': None}}),
  'move': ('stacked', {'layers': {'nnx': 0, 'linen': 1}}),
}
MODES = ('native', 'ours')


def measure(root: Path, cell: str, mode: str) -> dict:
  import jax

  jax.config.update('jax_num_cpu_devices', 8)
  import orbax.checkpoint as ocp
  from jax.sharding import NamedSharding

  import orbax_linen_nnx

  layout, stacks = CELLS[cell]
  mesh = rb.target_mesh()
  nnx_dir = root / 'shards' / layout
  meta = ocp.PyTreeCheckpointHandler().metadata(nnx_dir / str(rb.STEP) / 'default').tree
  abstract = rb.map_tree(
    lambda path, m: jax.ShapeDtypeStruct(
      tuple(m.shape), m.dtype, sharding=NamedSharding(mesh, rb.spec_of(tuple(m.shape), rb.stack_axis_of(path, layout)))
    ),
    meta,
  )
  with ocp.CheckpointManager(nnx_dir) as mngr:
    state = mngr.restore(rb.STEP, args=ocp.args.StandardRestore(abstract))
  jax.block_until_ready(state)
  out = Path(tempfile.mkdtemp(dir=root))
  before, _ = rb.rss_now_and_peak()
  start = time.perf_counter()
  with ocp.CheckpointManager(out) as mngr:
    if mode == 'native':
      mngr.save(rb.STEP, args=ocp.args.StandardSave(state))
    else:
      mngr.save(rb.STEP, args=orbax_linen_nnx.LinenCompatSave(state, stacks=stacks))
    mngr.wait_until_finished()
  wall = time.perf_counter() - start
  _, peak = rb.rss_now_and_peak()
  written = sum(f.stat().st_size for f in out.rglob('*') if f.is_file())
  shutil.rmtree(out)
  return {
    'cell': cell,
    'mode': mode,
    'wall_s': wall,
    'peak_over_state': peak - before,
    'bytes_on_disk': written,
    'device_peak_bytes': rb.device_peak_bytes(),
  }


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--size-mb', type=float, default=1000)
  ap.add_argument('--runs', type=int, default=3)
  ap.add_argument('--cache', type=Path, default=Path.home() / '.cache' / 'orbax_linen_nnx_bench')
  ap.add_argument('--json', type=Path, default=Path('benchmarks') / 'save_results.json')
  ap.add_argument('--one', nargs=3, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.one:
    root, cell, mode = args.one
    print(json.dumps(measure(Path(root), cell, mode)))
    return
  dm = rb.dims(args.size_mb)
  root = rb.build(
    args.cache, dm, f'decoder_D{dm["D"]}_L{dm["layers"]}', chunkings=('shards',), layouts=('unrolled', 'stacked')
  )
  rounds = []
  for r in range(args.runs):
    for cell in CELLS:
      for mode in MODES:
        done = subprocess.run(
          [sys.executable, __file__, '--one', str(root), cell, mode], capture_output=True, text=True, check=True
        )
        rounds.append({**json.loads(done.stdout.strip().splitlines()[-1]), 'round': r})
        print(rounds[-1], file=sys.stderr, flush=True)
  table = {}
  for cell in CELLS:
    get = lambda mode, key: [x[key] for x in rounds if x['cell'] == cell and x['mode'] == mode]
    ratio = lambda key: statistics.median(o / n for o, n in zip(get('ours', key), get('native', key)))
    table[cell] = {
      'native_s': statistics.median(get('native', 'wall_s')),
      'ours_s': statistics.median(get('ours', 'wall_s')),
      'time_ratio': ratio('wall_s'),
      'native_peak_mib': statistics.median(get('native', 'peak_over_state')) / 2**20,
      'ours_peak_mib': statistics.median(get('ours', 'peak_over_state')) / 2**20,
      'peak_ratio': ratio('peak_over_state'),
    }
    t = table[cell]
    print(
      f"{cell:8s} native {t['native_s']:.2f} s, ours {t['ours_s']:.2f} s ({t['time_ratio']:.2f}x);"
      f" peak over state: native {t['native_peak_mib']:.0f} MiB, ours {t['ours_peak_mib']:.0f} MiB"
      f" ({t['peak_ratio']:.2f}x)"
    )
  args.json.write_text(json.dumps({'dims': dm, 'runs': args.runs, 'cells': table, 'raw': rounds}, indent=1))


if __name__ == '__main__':
  main()
