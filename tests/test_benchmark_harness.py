"""The benchmark harness runs end to end at a tiny size (no timing is asserted: see benchmarks/)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_harness_runs_and_reports_every_mode(tmp_path):
  out = tmp_path / 'results.json'
  done = subprocess.run(
      [sys.executable, 'benchmarks/restore_bench.py', '--size-mb', '3', '--runs', '1', '--profile',
       '--skip-multiprocess', '--cache', str(tmp_path / 'cache'), '--json', str(out)],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  result = json.loads(out.read_text())
  assert set(result['results']) == {f'{m}/{t}' for m in ('native', 'linen_compat', 'convert')
                                    for t in ('plain', 'stacked')}
  for r in result['results'].values():
    assert r['median_s'] > 0 and r['state_mb'] > 0
    # Every mode restores the same bytes from disk (the whole state, once).
    assert abs(r['read_mb'] - result['results']['native/plain']['read_mb']) < 0.5
  assert set(result['profile']) == {'metadata', 'plan', 'read_and_place', 'rebuild'}
  assert 'linen_compat/native' in result['ratios']['stacked']
  assert done.stdout.rstrip().splitlines()[-1].startswith('linen_compat/stacked profile')
