"""How the package holds together: modules import one way, and one module touches Orbax's and JAX's internals.

CI runs this at the newest releases and at the declared floors: a private name that moved fails here, by
name, before it fails somewhere deep in a restore.
"""

import ast
import os
import pathlib
import re

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from orbax_linen_nnx import NotRestored, NotRestoredError, _internals

PACKAGE = pathlib.Path(_internals.__file__).parents[1]
LAYERS = ('planning', 'engine', 'faces')  # in the order they may import each other; layout.py below them all


def _modules() -> dict[str, pathlib.Path]:
  """Every module of the package by its name (names are unique across the layers)."""
  found = {p.stem: p for p in PACKAGE.rglob('*.py') if p.stem not in ('__init__', '__main__')}
  assert len(found) == len([p for p in PACKAGE.rglob('*.py') if p.stem not in ('__init__', '__main__')])
  return found


def _imports(path: pathlib.Path) -> set[str]:
  """The package modules a module imports (at any depth of its code: function-level imports count too)."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('orbax_linen_nnx'):
      parts = node.module.split('.')
      if len(parts) > 2 or (len(parts) == 2 and parts[1] not in LAYERS):
        names.add(parts[-1])
      else:  # from orbax_linen_nnx[.layer] import module, ...
        names |= {a.name for a in node.names}
    elif isinstance(node, ast.Import):
      names |= {a.name.split('.')[-1] for a in node.names if a.name.startswith('orbax_linen_nnx.')}
  return names


def test_the_file_list_shows_the_layers_and_they_import_one_way():
  """layout.py (pure tree meanings), planning/ (no IO), engine/ (storage and devices), faces/ (thin): each
  imports only from the layers before it."""
  layer_of = {m: (p.parent.name if p.parent != PACKAGE else 'top') for m, p in _modules().items()}
  assert {layer_of[m] for m in ('plans', 'planner', 'ops', 'rules', 'cost', 'options')} == {'planning'}
  assert {layer_of[m] for m in ('source', 'target', 'read', 'write', 'prepare', '_internals')} == {'engine'}
  assert {layer_of[m] for m in ('args', 'handler', 'v1', 'save', 'convert', 'compare', 'cli')} == {'faces'}
  rank = {'top': -1, 'planning': 0, 'engine': 1, 'faces': 2}
  for m, path in _modules().items():
    if m == 'demo':
      continue
    above = [n for n in _imports(path) if n in layer_of and rank[layer_of[n]] > rank[layer_of[m]]]
    assert not above, f'{layer_of[m]}/{m} imports {above} from a later layer'
  assert not _imports(PACKAGE / 'layout.py') & set(layer_of), 'layout.py is the bottom layer'


def test_modules_import_one_way():
  paths = _modules()
  modules = set(paths)
  graph = {m: _imports(paths[m]) & modules - {m} for m in modules}
  seen, stack = set(), []

  def visit(m):
    assert m not in stack, ' -> '.join(stack[stack.index(m) :] + [m])  # an import cycle
    if m in seen:
      return
    stack.append(m)
    for n in sorted(graph[m]):
      visit(n)
    stack.pop()
    seen.add(m)

  for m in sorted(modules):
    visit(m)
  # The plan's data types and the pure layers (the planner too: `prepare` opens what it plans) import no engine
  # and no face.
  for pure in ('layout', 'plans', 'ops', 'rules', 'stacks', 'pairing', 'diagnose', 'grid', 'options', 'planner'):
    assert not graph[pure] & {'read', 'source', 'target', 'handler', 'args', 'save', 'convert', 'cli', 'v1'}, pure
  # The cost model plans without the read engine: the chunk grid and box arithmetic they share are `grid`'s.
  assert 'read' not in graph['cost'] and graph['grid'] == {'ops'}, (graph['cost'], graph['grid'])


def test_only_the_internals_module_touches_private_names():
  private = re.compile(r'\b(orbax\.checkpoint\._src|jax\._src)\b|\._impl\b|\._array_metadata_store\b')
  offenders = [
    f'{p.name}:{i}'
    for p in sorted(PACKAGE.rglob('*.py'))
    if p.name != '_internals.py'
    for i, line in enumerate(p.read_text().splitlines(), 1)
    if private.search(line)
  ]
  assert not offenders, offenders


def test_every_private_name_resolves():
  for name in (
    'InternalTreeMetadata',
    'build_array_read_spec',
    'build_array_write_spec',
    'RANDOM_KEY_IMPL',
    'ArrayMetadataStore',
    'run_sync',
    'get_process_index_for_subdir',
    'serialize_shardings',
  ):
    assert getattr(_internals, name) is not None, name
  assert hasattr(_internals.InternalTreeMetadata, 'from_json')
  store = _internals.array_metadata_store(ocp.type_handlers.get_type_handler(jax.Array))
  assert store is not None and hasattr(store, 'write')
  assert _internals.key_impl_name(jax.eval_shape(lambda: jax.random.key(0)).dtype) == 'threefry2x32'
  assert _internals.distributed_client() is None  # one process: no runtime client, and the lookup works


def test_jax_refuses_a_placeholder_by_name():
  """The value registries NotRestored hooks into: with them, JAX raises NotRestoredError naming the leaf."""
  assert _internals.refuse_as_jax_value(NotRestored, NotRestored.fail)
  leaf = NotRestored('model/fc1/kernel', jax.ShapeDtypeStruct((2, 2), np.float32))
  for use in (lambda: jax.jit(lambda a: a)(leaf), lambda: jax.device_put(leaf), lambda: jax.numpy.sum(leaf)):
    with pytest.raises(NotRestoredError, match='model/fc1/kernel'):
      use()


def test_the_built_wheel_and_sdist_are_ready_to_publish(tmp_path):
  """What `python -m build` makes from this checkout passes `twine check`; the wheel holds the package, its
  `py.typed`, the license, the command line's entry point and the one version `__version__` states."""
  import subprocess
  import sys
  import zipfile

  import orbax_linen_nnx

  repo = PACKAGE.parent
  done = subprocess.run(
    [sys.executable, '-m', 'build', '--no-isolation', '--outdir', str(tmp_path), str(repo)],
    capture_output=True,
    text=True,
    timeout=280,
    cwd=tmp_path,
  )
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  version = orbax_linen_nnx.__version__
  wheel = tmp_path / f'orbax_linen_nnx-{version}-py3-none-any.whl'
  sdist = tmp_path / f'orbax_linen_nnx-{version}.tar.gz'
  assert wheel.exists() and sdist.exists(), sorted(p.name for p in tmp_path.iterdir())
  done = subprocess.run(
    [sys.executable, '-m', 'twine', 'check', '--strict', str(wheel), str(sdist)],
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert done.returncode == 0, done.stdout + done.stderr
  names = zipfile.ZipFile(wheel).namelist()
  info = f'orbax_linen_nnx-{version}.dist-info'
  assert 'orbax_linen_nnx/py.typed' in names and 'orbax_linen_nnx/faces/cli.py' in names
  assert any(n.startswith(info) and n.endswith('LICENSE') for n in names), names
  assert not any(n.startswith('tests/') for n in names)
  metadata = zipfile.ZipFile(wheel).read(f'{info}/METADATA').decode()
  assert f'Version: {version}\n' in metadata and 'Requires-Python: >=3.11' in metadata
  entry_points = zipfile.ZipFile(wheel).read(f'{info}/entry_points.txt').decode()
  assert 'orbax-linen-nnx = orbax_linen_nnx.faces.cli:main' in entry_points
  # Installed into a fresh virtual environment (the wheel alone; its dependencies come from this one's
  # site-packages on PYTHONPATH, where the checkout's editable install is invisible), it imports from there,
  # every layer with it, and its command line runs.
  import site
  import venv

  fresh = tmp_path / 'fresh'
  venv.create(fresh, with_pip=False)
  python = fresh / 'bin' / 'python'
  # Run from elsewhere, with no PYTHONPATH: an egg-info beside the checkout must not pass for an installed copy.
  quiet = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  done = subprocess.run(
    [sys.executable, '-m', 'pip', '--python', str(python), 'install', '--no-deps', '--no-index', '--ignore-installed']
    + ['-q', str(wheel)],
    capture_output=True,
    text=True,
    timeout=120,
    cwd=tmp_path,
    env=quiet,
  )
  assert done.returncode == 0, done.stdout + done.stderr
  env = {'PYTHONPATH': os.pathsep.join(site.getsitepackages()), 'PATH': os.environ['PATH'], 'JAX_PLATFORMS': 'cpu'}
  check = (
    'import orbax_linen_nnx as o, orbax_linen_nnx.faces.cli, orbax_linen_nnx.engine.read, orbax_linen_nnx.planning.ops;'
    ' print(o.__file__, o.__version__, o.LinenCompatRestore.__module__)'
  )
  done = subprocess.run([str(python), '-c', check], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
  assert done.returncode == 0, done.stderr[-3000:]
  where, shown, args_module = done.stdout.split()
  assert where.startswith(str(fresh)) and shown == version and args_module == 'orbax_linen_nnx.faces.args', done.stdout
  done = subprocess.run(
    [str(fresh / 'bin' / 'orbax-linen-nnx'), '--version'], capture_output=True, text=True, timeout=120, env=env
  )
  assert done.returncode == 0 and version in done.stdout, done.stdout + done.stderr


def test_every_module_is_still_reachable_by_its_name_before_the_layers():
  """Code written against the flat package keeps working: `from orbax_linen_nnx import planner` and
  `from orbax_linen_nnx.rules import rename` give the modules' homes in the layers."""
  import importlib

  import orbax_linen_nnx

  for name, path in _modules().items():
    if path.parent == PACKAGE:
      continue
    home = importlib.import_module(f'orbax_linen_nnx.{path.parent.name}.{name}')
    assert getattr(orbax_linen_nnx, name) is home, name
    assert importlib.import_module(f'orbax_linen_nnx.{name}') is home, name
  assert orbax_linen_nnx.plan is orbax_linen_nnx.faces.handler.plan  # public functions keep their names
