"""The examples in the package's docstrings run and print what they show (`>>>` lines, doctest)."""

import doctest
import importlib
import pathlib

import pytest

import orbax_linen_nnx

PACKAGE = pathlib.Path(orbax_linen_nnx.__file__).parent
MODULES = sorted(
  '.'.join(('orbax_linen_nnx',) + p.relative_to(PACKAGE).with_suffix('').parts).removesuffix('.__init__')
  for p in PACKAGE.rglob('*.py')
  if p.stem not in ('__main__', 'demo')  # the command line's entry and the demo run when imported
)


@pytest.mark.parametrize('name', MODULES)
def test_the_docstring_examples_of_the_module_run(name):
  module = importlib.import_module(name)
  found = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, report=False)
  assert found.failed == 0, f'{found.failed} of {found.attempted} examples in {name} fail (python -m doctest -v)'


def test_there_are_examples_to_run():
  total = sum(
    doctest.testmod(importlib.import_module(n), optionflags=doctest.ELLIPSIS, report=False).attempted for n in MODULES
  )
  assert total >= 20, total
