"""Every Python snippet in README.md runs, in order, in a fresh interpreter (tests/snippets.py)."""

import subprocess
import sys

from snippets import ROOT, python_blocks, run_page


def test_readme_python_snippets_run(tmp_path):
  text = (ROOT / 'README.md').read_text()
  assert len(python_blocks(text)) >= 2
  printed = run_page(text, tmp_path)
  assert 'linen -> nnx: 14 arrays to read' in printed
  assert len(text.splitlines()) <= 250, 'the README is the two commands, an example and a map of the docs'


def test_readme_starts_with_the_two_commands():
  lines = (ROOT / 'README.md').read_text().splitlines()
  commands = lines[lines.index('```bash') + 1 : lines.index('```bash') + 3]
  assert commands[0].endswith('python -m orbax_linen_nnx.demo')
  ci = (ROOT / '.ci' / 'run').read_text()
  assert commands[1] in ci


def test_demo_resumes_linen_run_with_equal_losses():
  done = subprocess.run(
    [sys.executable, '-m', 'orbax_linen_nnx.demo'], cwd=ROOT, capture_output=True, text=True, timeout=300
  )
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  assert 'NNX losses match Linen losses: True' in done.stdout
