"""The versions CI tests are the versions the package declares."""

import importlib.metadata
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def declared_floors() -> dict[str, str]:
  text = (ROOT / 'pyproject.toml').read_text()
  deps = re.search(r'dependencies = \[(.*?)\]', text, flags=re.S).group(1)
  return dict(re.findall(r'"([a-z-]+)>=([0-9.]+)"', deps))


def test_ci_floors_are_the_declared_floors_and_nothing_is_capped():
  floors = dict(re.findall(r'^([a-z-]+)==([0-9.]+)$', (ROOT / '.ci' / 'floors.txt').read_text(), flags=re.M))
  declared = declared_floors()
  for name in ('orbax-checkpoint', 'flax', 'jax', 'tensorstore'):
    assert floors[name] == declared[name], (name, floors, declared)
  assert floors['jaxlib'] == floors['jax']
  text = (ROOT / 'pyproject.toml').read_text()
  assert '<' not in re.search(r'dependencies = \[(.*?)\]', text, flags=re.S).group(1), (
    'an upper cap needs a documented break'
  )


def test_installed_versions_satisfy_the_floors():
  for name, floor in declared_floors().items():
    installed = importlib.metadata.version(name)
    as_tuple = lambda v: tuple(int(x) for x in re.findall(r'\d+', v)[:3])
    assert as_tuple(installed) >= as_tuple(floor), (name, installed, floor)
    print(f'{name} {installed} (floor {floor})')
