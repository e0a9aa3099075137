"""Runs the code a page of documentation shows, as a reader would, and checks what it says it prints.

A page's ```python blocks run in order, as one script, in a fresh interpreter in an empty folder; each
```console block's `$` commands then run in that folder, and every line shown under a command is in its
output ('...' stands for text that differs per run, such as absolute paths); every line of a ```text
block is in what the script printed.
"""

import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def python_blocks(text):
  return re.findall(r'^```python\n(.*?)^```', text, flags=re.S | re.M)


def run_page(text, folder, timeout=300):
  """Runs `text`'s blocks in `folder`; returns what the Python blocks printed."""
  script = pathlib.Path(folder) / 'page_snippets.py'
  script.write_text('\n'.join(python_blocks(text)))
  env = {
    **os.environ,
    'PATH': f'{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ["PATH"]}',
    'JAX_PLATFORMS': 'cpu',
  }
  done = subprocess.run(
    [sys.executable, str(script)], cwd=folder, env=env, capture_output=True, text=True, timeout=timeout
  )
  assert done.returncode == 0, done.stderr[-4000:]
  for block in re.findall(r'^```console\n(.*?)^```', text, flags=re.S | re.M):
    for command, shown in re.findall(r'^\$ (.*)\n((?:(?!\$ ).*\n)*)', block, flags=re.M):
      ran = subprocess.run(command, shell=True, cwd=folder, env=env, capture_output=True, text=True, timeout=timeout)
      assert ran.returncode == 0, (command, ran.stderr[-3000:])
      for line in shown.splitlines():
        if line != '...':
          pattern = '.*'.join(map(re.escape, line.split('...')))
          assert re.search(pattern, ran.stdout), (command, line, ran.stdout)
  for block in re.findall(r'^```text\n(.*?)^```', text, flags=re.S | re.M):
    for line in block.splitlines():
      if line.strip() != '...':
        assert line in done.stdout, line
  return done.stdout
