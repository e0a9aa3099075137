"""The documentation site (docs/, MkDocs): every page's code runs as shown, every page is in the site's
navigation, and the site builds with warnings as errors (the API reference is made from the docstrings)."""

import re
import subprocess
import sys

import pytest

from snippets import ROOT, python_blocks, run_page

PAGES = sorted((ROOT / 'docs').glob('*.md'))


@pytest.mark.parametrize('page', PAGES, ids=lambda p: p.stem)
def test_every_code_block_of_the_page_runs(page, tmp_path):
  text = page.read_text()
  blocks = re.findall(r'^```(\w*)', text, flags=re.M)[::2]  # the opening fence of each block
  # Only blocks the test runs or checks: a block in another language would be shown unchecked.
  assert set(blocks) <= {'python', 'console', 'text'}, (page.name, set(blocks))
  if not blocks:
    return
  assert 'python' in blocks or 'console' in blocks or not python_blocks(text), page.name
  run_page(text, tmp_path)


def test_every_page_is_in_the_navigation_and_the_site_builds_without_a_warning(tmp_path):
  config = (ROOT / 'mkdocs.yml').read_text()
  listed = set(re.findall(r'([\w-]+\.md)', config))
  assert listed == {p.name for p in PAGES}, listed ^ {p.name for p in PAGES}
  done = subprocess.run(
    [sys.executable, '-m', 'mkdocs', 'build', '--strict', '--site-dir', str(tmp_path / 'site')],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert done.returncode == 0, done.stderr[-4000:]
  api = (tmp_path / 'site' / 'api' / 'index.html').read_text()
  import orbax_linen_nnx

  for name in orbax_linen_nnx.__all__:
    assert re.search(rf'id="orbax_linen_nnx\.{name}"', api), f'the API reference leaves out {name}'
  options = (tmp_path / 'site' / 'options' / 'index.html').read_text()
  for field in orbax_linen_nnx.options.FIELDS:
    assert field in options, field
