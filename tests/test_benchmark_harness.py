"""The benchmark harness runs end to end at a tiny size (no timing is asserted: see benchmarks/)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_harness_runs_and_reports_every_mode(tmp_path):
  out = tmp_path / 'results.json'
  done = subprocess.run(
    [
      sys.executable,
      'benchmarks/restore_bench.py',
      '--size-mb',
      '3',
      '--runs',
      '1',
      '--cells',
      'plain,stack',
      '--chunkings',
      'host,mesh',
      '--profile',
      '--skip-many',
      '--skip-multiprocess',
      '--cache',
      str(tmp_path / 'cache'),
      '--json',
      str(out),
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  result = json.loads(out.read_text())
  assert set(result['cells']) == {f'decoder/{c}/{t}' for c in ('host', 'mesh') for t in ('plain', 'stack')}
  for cell in result['cells'].values():
    assert set(cell['results']) == {'native', 'ours', 'naive'}
    for r in cell['results'].values():
      assert r['median_s'] > 0 and r['state_mb'] > 0 and r['read_mb'] > 0
    assert {'ours/native time', 'naive/ours peak RSS'} <= set(cell['ratios'])
  # Host-saved arrays are one chunk each: ours decodes each once (native, per device slice).
  host = result['cells']['decoder/host/plain']['results']
  layers, copies = result['dims']['layers'], 3  # params, mu, nu
  stored = copies * (2 + 7 * layers) + 2  # embed, head, 7 kernels per layer; count, step
  assert host['ours']['chunk_reads'] == stored < host['native']['chunk_reads']
  assert set(result['profile']['decoder/host/stack']) == {'open_and_list', 'plan', 'cost', 'read_and_place', 'rebuild'}
  assert done.stdout.rstrip().splitlines()[-1].startswith('profile decoder/shards/plain')
