"""Every Python snippet in README.md runs, in order, in a fresh interpreter."""

import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_python_snippets_run(tmp_path):
  text = (ROOT / 'README.md').read_text()
  blocks = re.findall(r'```python\n(.*?)```', text, flags=re.S)
  assert len(blocks) >= 5
  script = tmp_path / 'readme_snippets.py'
  script.write_text('\n'.join(blocks))
  done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-4000:]
  assert 'linen -> nnx: 14 arrays to read' in done.stdout
  # The command line section: each `$` command runs where the snippets ran; each line shown under it is in
  # its real output ('...' stands for text that differs per machine, such as absolute paths).
  env = {**os.environ, 'PATH': f'{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ["PATH"]}',
         'JAX_PLATFORMS': 'cpu'}
  consoles = re.findall(r'```console\n(.*?)```', text, flags=re.S)
  assert consoles
  for block in consoles:
    for command, shown in re.findall(r'^\$ (.*)\n((?:(?!\$ ).*\n)*)', block, flags=re.M):
      ran = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
      assert ran.returncode == 0, (command, ran.stderr[-3000:])
      for line in shown.splitlines():
        if line != '...':
          pattern = '.*'.join(map(re.escape, line.split('...')))
          assert re.search(pattern, ran.stdout), (command, line, ran.stdout)
  # The plan outputs the README shows are what the snippets print.
  shown = re.findall(r'```text\n(.*?)```', text, flags=re.S)
  for block in shown:
    for line in block.splitlines():
      if line.strip() != '...':
        assert line in done.stdout, line


def test_readme_starts_with_the_two_commands():
  lines = (ROOT / 'README.md').read_text().splitlines()
  commands = lines[lines.index('```bash') + 1: lines.index('```bash') + 3]
  assert commands[0].endswith('python -m orbax_linen_nnx.demo')
  ci = (ROOT / '.ci' / 'run').read_text()
  assert commands[1] in ci


def test_demo_resumes_linen_run_with_equal_losses():
  done = subprocess.run([sys.executable, '-m', 'orbax_linen_nnx.demo'], cwd=ROOT, capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  assert 'NNX losses match Linen losses: True' in done.stdout
