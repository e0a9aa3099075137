"""`convert`'s writer: every stored chunk decoded once per process, whatever the chunks and the transform.

Each case saves a real checkpoint (CheckpointManager, the chunking as the saving run had it), plans a
conversion as the command line does, and writes it block by block into new arrays; TensorStore's counters
(the OCDBT key reads of the source: one per stored chunk loaded) prove that each stored chunk under the
blocks was loaded once, although blocks are smaller than chunks here, and the values are compared with what
the read engine restores from the same plan, bit for bit.
"""

import asyncio
import collections
import math
import re

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts
from jax.sharding import NamedSharding, PartitionSpec as P

from helpers import OCDBT_READS, counter, save
from orbax_linen_nnx import cli, convert, ops, read, reshape, source, split, transpose, write

L, D, F = 4, 128, 96
rng = np.random.default_rng(0)


def w(*shape):
  return rng.standard_normal(shape, dtype=np.float32)


# transform -> (the Linen params tree, plan_to options)
CASES = {
  'plain': (lambda: {'Dense_0': {'kernel': w(D, F)}, 'Dense_1': {'bias': w(F)}}, {'rules': {'Dense_0': 'fc1'}}),
  'move': (lambda: {'layers': {'mlp': {'kernel': w(D, L, F)}}}, {'stacks': {'layers': {'nnx': 0}}}),
  'stack': (
    lambda: {f'layers_{i}': {'mlp': {'kernel': w(D, F)}} for i in range(L)},
    {'stacks': {'layers': {'nnx': 0}}},
  ),
  'unstack': (lambda: {'layers': {'mlp': {'kernel': w(D, L, F)}}}, {'stacks': {'layers': {'nnx': None}}}),
  'split': (
    lambda: {'mlp': {'gating': w(2, D, F)}},
    {'rules': [split('mlp/gating', ['mlp/gate/kernel', 'mlp/up/kernel'], axis=0)]},
  ),
  'transpose': (lambda: {'mlp': {'kernel': w(F, D)}}, {'rules': [transpose('mlp/kernel', (1, 0))]}),
  'reshape': (lambda: {'q': {'kernel': w(D, 4, F // 4)}}, {'rules': [reshape('q/kernel', (D, 4, F // 4), (D, F))]}),
}


def placed(tree, mesh, chunking: str):
  """The arrays as the saving run held them: host numpy (one stored chunk each), row shards, or a 2-D grid."""

  def put(a):
    if chunking == 'host':
      return a
    spec = P('data') if chunking == 'rows' else P('data', 'model')
    spec = P(*tuple(spec)[: a.ndim]) if a.shape[0] % 4 == 0 and (a.ndim > 1 or chunking == 'rows') else P()
    return jax.device_put(a, NamedSharding(mesh, spec))

  return jax.tree.map(put, tree)


def stored_chunks(ckpt, names) -> int:
  total = 0
  for n in names:
    grid = read.Grid(ckpt.stores[n])
    total += math.prod(-(-s // c) for s, c in zip(grid.shape, grid.chunk))
  return total


def write_to_memory(job) -> list:
  """Runs the job into in-memory zarr arrays chunked as the job lays each target out."""
  dests = [
    ts.open(
      {
        'driver': 'zarr',
        'kvstore': {'driver': 'memory'},
        'metadata': {
          'shape': list(lay.read.target.shape),
          'chunks': list(lay.block_shape),
          'dtype': np.dtype(lay.read.target.dtype).str,
        },
      },
      create=True,
    ).result()
    for lay in job.layouts
  ]
  asyncio.run(job.run(dests))
  return dests


@pytest.mark.parametrize('chunking', ['host', 'rows', 'grid'])
@pytest.mark.parametrize('case', list(CASES))
def test_each_stored_chunk_is_decoded_once_whatever_the_blocks(tmp_path, mesh, case, chunking):
  make, options = CASES[case]
  save(tmp_path / 'linen', {'params': placed(make(), mesh, chunking)})
  ckpt = source.open_checkpoint(tmp_path / 'linen')
  plan = convert.plan_to(ckpt, 'nnx', **options)
  names = {x.name for r in plan.reads for s in r.sources for x in ops.stored_leaves(s)}
  # Blocks of about 1 KiB (a 4 KiB budget), smaller than the stored chunks: chunks feed several blocks.
  job = write.Job.make(plan.reads, ckpt, 4 * 2**10)
  assert max(collections.Counter(c for b in job.blocks for c in b.chunks).values()) > 1
  before = counter(OCDBT_READS)
  dests = write_to_memory(job)
  assert counter(OCDBT_READS) - before == stored_chunks(ckpt, names)

  # The values: what the read engine restores from the same plan, bit for bit.
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  want = read.execute(convert.with_shardings(plan, lambda t: one), source.open_checkpoint(tmp_path / 'linen'))
  for lay, dest in zip(job.layouts, dests):
    np.testing.assert_array_equal(
      dest.read().result(), np.asarray(want[lay.read.target.path]), err_msg=str(lay.read.target.path)
    )


def test_a_chunk_larger_than_the_cache_is_decoded_once_and_held_for_its_blocks(tmp_path, capsys):
  """A 6 MiB single-chunk stack (published checkpoints store arrays so) with a 1 MiB budget: its 24 blocks
  are written from one decode, the chunk held in a cache grown to it; memory is then that chunk plus the
  budget."""
  stacked = w(256, L, 1536)  # 6 MiB, one stored chunk
  save(tmp_path / 'linen', {'params': {'layers': {'mlp': {'kernel': stacked}}}})
  ckpt = source.open_checkpoint(tmp_path / 'linen')
  plan = convert.plan_to(ckpt, 'nnx', stacks={'layers': {'nnx': 0}})
  job = write.Job.make(plan.reads, ckpt, 2**20)
  assert job.held_chunk == stacked.nbytes and len(job.blocks) >= 24
  before = counter(OCDBT_READS)
  (dest,) = write_to_memory(job)
  assert counter(OCDBT_READS) - before == 1
  np.testing.assert_array_equal(dest.read().result(), np.moveaxis(stacked, 1, 0))
  # The plan says so, before anything is read.
  assert cli.main(['plan', str(tmp_path / 'linen'), '--to', 'nnx', '--stacks', '{"layers": {"nnx": 0}}']) == 0
  assert 'convert: reads' not in capsys.readouterr().out  # the convert's cost where asked for
  assert (
    cli.main(['plan', str(tmp_path / 'linen'), '--to', 'nnx', '--stacks', '{"layers": {"nnx": 0}}', '--verbose']) == 0
  )
  out = capsys.readouterr().out
  assert (
    f'note    convert: reads 6.0 MiB of stored chunks (1 chunk reads in all) and writes 6.0 MiB'
    f' ({len(write.Job.make(plan.reads, ckpt, convert.DEFAULT_BATCH_BYTES).every)} blocks in all); host memory about the 32.0 MiB budget + 6.0 MiB of stored chunks that'
    ' feed several blocks each'
  ) in out, out
  # Shared out over 4 processes: each decodes the one chunk, each writes a quarter.
  assert (
    cli.main(['plan', str(tmp_path / 'linen'), '--to', 'nnx', '--stacks', '{"layers": {"nnx": 0}}', '--processes', '4'])
    == 0
  )
  out = capsys.readouterr().out
  assert (
    'convert: on 4 processes each reads 6.0 MiB of stored chunks (4 chunk reads in all) and writes 1.5 MiB' in out
  ), out
  # A host memory limit: a warning, an error with --strict-cost, and the budget it proposes then fits.
  limit = [
    'plan',
    str(tmp_path / 'linen'),
    '--to',
    'nnx',
    '--stacks',
    '{"layers": {"nnx": 0}}',
    '--host-memory-limit',
    '10MiB',
  ]
  assert cli.main(limit) == cli.EXIT_OK
  assert 'warning: a convert of it holds about 38.0 MiB on the host' in capsys.readouterr().err
  assert cli.main(limit + ['--strict-cost']) == cli.EXIT_PLAN
  err = capsys.readouterr().err
  assert '1 cost problem(s) with --strict-cost' in err, err
  budget = err.split('Fix: --budget ')[1].split(',')[0]
  assert cli.main(limit + ['--strict-cost', '--budget', budget]) == cli.EXIT_OK
  assert 'warning' not in capsys.readouterr().err


def test_a_host_memory_limit_below_one_stored_chunk_proposes_no_budget_that_cannot_fit(tmp_path, capsys):
  """Issue 30: `--host-memory-limit 1K --strict-cost` used to propose `--budget 1`, which fails the same way
  (a stored chunk is decoded whole). Now it says no budget fits and the limit that does; that limit, applied,
  plans."""
  ocp.PyTreeCheckpointer().save(tmp_path / 'c', {'params': {'Dense_0': {'kernel': np.ones((256, 512), np.float32)}}})
  plan = ['plan', str(tmp_path / 'c'), '--to', 'nnx', '--strict-cost']
  assert cli.main(plan + ['--host-memory-limit', '1K']) == cli.EXIT_PLAN
  err = capsys.readouterr().err
  assert 'no --budget fits under it: one stored chunk is 512.0 KiB and is decoded whole' in err, err
  assert 'Fix: --budget' not in err
  limit, budget = re.search(
    r'raise --host-memory-limit to at least [\d.]+ \w+ \((\d+) bytes\) with --budget (\d+)', err
  ).groups()
  assert cli.main(plan + ['--host-memory-limit', limit, '--budget', budget]) == cli.EXIT_OK, capsys.readouterr().err
