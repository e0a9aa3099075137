"""The plan's cost: what each process reads, decodes, places and holds, known before reading.

Checked against what happens: TensorStore's counters around the restore the plan describes (here, one
process of 8 devices; test_multihost.py checks simulated processes against real ones), JAX's own placement
of every sharding, and an independent count of the chunks under each device's box.
"""

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec as P

import models
import orbax_linen_nnx
from helpers import ChunkLoads, chunk_ids, make_bn_drop, save, tx
from orbax_linen_nnx import LinenCompatRestore, cost as cost_lib, plans, save as save_lib


SPECS = [
  P(),
  P('data'),
  P(None, 'model'),
  P('data', 'model'),
  P('model', 'data'),
  P(('data', 'model')),
  P(('model', 'data'), None),
  P(None, ('data', 'model')),
]


@pytest.mark.parametrize('shape', [(8, 16), (16, 8), (8, 8)])
@pytest.mark.parametrize('spec', SPECS, ids=str)
def test_simulated_placement_is_jaxs(mesh, spec, shape):
  """Each mesh position's box, computed without devices, is the one JAX gives the device there."""
  sharding = NamedSharding(mesh, spec)
  boxes = cost_lib.named_boxes(sharding, shape)
  indices = sharding.devices_indices_map(shape)
  for position, device in enumerate(mesh.devices.flat):
    assert boxes[position] == tuple(s.indices(n)[:2] for s, n in zip(indices[device], shape)), (position, device)
  # The same over an AbstractMesh of that shape.
  abstract = NamedSharding(AbstractMesh(mesh.axis_sizes, mesh.axis_names), spec)
  assert cost_lib.named_boxes(abstract, shape) == boxes


def _kernel_checkpoint(tmp_path, mesh, shape, spec, dtype=np.float32):
  """A checkpoint of one kernel saved sharded by `spec` on `mesh` (one stored chunk per distinct shard)."""
  values = np.arange(np.prod(shape), dtype=np.float32).reshape(shape).astype(dtype)
  arr = jax.make_array_from_callback(shape, NamedSharding(mesh, spec), lambda i: values[i])
  save(tmp_path / 'run', what=ocp.args.StandardSave({'params': {'Dense_0': {'kernel': arr}}}))
  return tmp_path / 'run' / '1' / 'default', values


@pytest.mark.parametrize(
  'saved, wanted',
  [
    (P('data', 'model'), P('data', 'model')),
    (P('data', 'model'), P('model', 'data')),
    (P('data'), P(None, 'model')),
    (P(), P('data', 'model')),
  ],
  ids=str,
)
def test_the_cost_is_what_the_restore_decodes(tmp_path, mesh, saved, wanted):
  item, values = _kernel_checkpoint(tmp_path, mesh, (64, 32), saved)
  target = NamedSharding(mesh, wanted)
  abstract = {'fc': {'kernel': jax.ShapeDtypeStruct((64, 32), np.float32, sharding=target)}}
  rules = {'Dense_0': 'fc'}
  plan = orbax_linen_nnx.plan(item, abstract, rules=rules)
  cost = plan.cost.of(0)
  with ChunkLoads(item) as loads:
    restored = ocp.CheckpointManager(tmp_path / 'run').restore(1, args=LinenCompatRestore(abstract, rules=rules))
  np.testing.assert_array_equal(np.asarray(restored['fc']['kernel']), values)
  assert cost.chunks == loads.count
  chunk = tuple(ocp.PyTreeCheckpointHandler().metadata(item).tree['params']['Dense_0']['kernel'].storage.chunk_shape)
  assert cost.read_bytes == cost.chunks * int(np.prod(chunk)) * 4
  assert cost.needed_bytes == values.nbytes  # one process needs every element once
  shard_bytes = int(np.prod(target.shard_shape((64, 32)))) * 4
  assert cost.placed_bytes == 8 * shard_bytes and cost.device_max_bytes == shard_bytes
  assert cost.host_bound_bytes <= cost.budget_bytes + cost.largest_chunk_bytes
  assert f'process 0 (8 devices): reads {plans.size_text(cost.read_bytes)}' in str(plan)


def test_a_pod_is_planned_from_one_machine_and_every_chunk_goes_where_it_is_needed(tmp_path, mesh):
  """A 256-device AbstractMesh on 64 simulated processes: each process decodes exactly the chunks under its
  own devices' boxes (counted here independently), every chunk is read by just the processes that need it,
  and the totals add up."""
  item, _ = _kernel_checkpoint(tmp_path, mesh, (512, 256), P('data', 'model'))
  pod = AbstractMesh((64, 4), ('fsdp', 'tp'))
  target = NamedSharding(pod, P('tp', 'fsdp'))  # another layout than saved: chunks are shared
  abstract = {'fc': {'kernel': jax.ShapeDtypeStruct((512, 256), np.float32, sharding=target)}}
  plan = orbax_linen_nnx.plan(item, abstract, rules={'Dense_0': 'fc'}, processes=64)
  assert plan.cost.simulated and len(plan.cost.processes) == 64
  with pytest.raises(ValueError, match='do not split evenly'):
    orbax_linen_nnx.plan(item, abstract, rules={'Dense_0': 'fc'}, processes=48)
  grids = cost_lib.grids_of(plan, orbax_linen_nnx.source.open_checkpoint(item).stores)
  full = cost_lib.estimate(plan, grids, topology=cost_lib.Topology(64), chunks_of=True)
  assert [p.chunks for p in full.processes] == [p.chunks for p in plan.cost.processes]
  (name,) = grids
  chunk = grids[name].chunk
  boxes = cost_lib.named_boxes(target, (512, 256))
  readers = {}
  for position, box in enumerate(boxes):  # 4 consecutive positions a process
    index = tuple(slice(lo, hi) for lo, hi in box)
    for c in chunk_ids(index, (512, 256), chunk):
      readers.setdefault(c, set()).add(position // 4)
  for p in full.processes:
    assert p.devices == 4
    assert set(p.chunk_ids[name]) == {c for c, who in readers.items() if p.process in who}, p.process
  assert sum(p.chunks for p in full.processes) == sum(len(who) for who in readers.values())
  summary = plan.cost.summary()
  assert summary['placed_bytes']['total'] == 512 * 256 * 4  # each device holds a different box
  assert summary['device_max_bytes']['max'] == 512 * 256 * 4 // 256
  assert '64 processes (simulated)' in str(plan)
  # Any other device -> process map: here, the mesh's columns by process instead of its rows.
  columns = [(i % 4) * 16 + (i // 4) // 4 for i in range(256)]
  other = orbax_linen_nnx.plan(item, abstract, rules={'Dense_0': 'fc'}, device_process=columns)
  assert len(other.cost.processes) == 64 and {p.devices for p in other.cost.processes} == {4}
  with pytest.raises(ValueError, match='names 8 devices; the mesh has 256'):
    orbax_linen_nnx.plan(item, abstract, rules={'Dense_0': 'fc'}, device_process=range(8))


def test_over_read_and_big_chunks_are_named(tmp_path, mesh):
  """A published array stored as one chunk, read by 8 devices in slices: the plan says which leaf decodes
  whole chunks far larger than its slices, and the over-read it causes."""
  shape = (4096, 1024)  # 16 MiB of float32, one chunk (without OCDBT, Orbax stores each shard as one)
  item = tmp_path / 'published'
  with ocp.Checkpointer(ocp.StandardCheckpointHandler(use_ocdbt=False)) as ckptr:
    ckptr.save(item, {'params': {'Dense_0': {'kernel': np.ones(shape, np.float32)}}})
  pod = AbstractMesh((4, 2), ('data', 'model'))
  abstract = {
    'fc': {'kernel': jax.ShapeDtypeStruct(shape, np.float32, sharding=NamedSharding(pod, P('data', 'model')))}
  }
  plan = orbax_linen_nnx.plan(item, abstract, rules={'Dense_0': 'fc'}, processes=8)
  p = plan.cost.of(3)
  assert p.read_bytes == 16 * 2**20 and p.needed_bytes == 2 * 2**20 and p.over_read == 8
  assert [c.path for c in p.big_chunks()] == ['fc/kernel']
  text = '\n'.join(p.lines())
  assert 'over-read 8.00x' in text and 'fc/kernel: stored chunks of 16.0 MiB for slices of at most 2.0 MiB' in text


def test_a_restore_of_a_model_states_its_cost(tmp_path, mesh):
  """The journeys' BatchNorm + Dropout model: every leaf's cost is in the plan of a real restore, and the
  printed plan says what this process will read and hold."""
  linen = models.linen_bn_drop_state(tx(), steps=1)
  save(tmp_path / 'run', what=ocp.args.StandardSave(linen))

  abstract = models.shard_abstract(nnx.state(nnx.eval_shape(make_bn_drop)), mesh, 'two_axes')
  with ChunkLoads(tmp_path / 'run' / '1' / 'default') as loads:
    plan = ocp.CheckpointManager(tmp_path / 'run').restore(
      1, args=LinenCompatRestore(abstract, rules=models.DROP_RULES, dry_run=True)
    )
  assert loads.count == 0  # a dry run reads no chunk
  cost = plan.cost.of(0)
  assert cost.devices == 8 and cost.chunks > 0 and cost.read_bytes >= cost.needed_bytes
  assert {c.path for c in cost.leaves} == {'/'.join(r.target.path) for r in plan.reads}


def test_expensive_mistakes_warn_and_strict_cost_refuses_them_before_any_read(tmp_path, mesh):
  """Over-read above the factor given, a host memory bound above the limit given, and a large leaf
  replicated for want of a sharding: warnings by default, one PlanError naming all with `strict_cost`, and
  the fixes they propose then plan clean."""
  shape = (4096, 1024)  # 16 MiB, one stored chunk (no OCDBT)
  item = tmp_path / 'published'
  with ocp.Checkpointer(ocp.StandardCheckpointHandler(use_ocdbt=False)) as ckptr:
    ckptr.save(
      item,
      {
        'params': {
          'Dense_0': {'kernel': np.ones(shape, np.float32)},
          'Embed_0': {'embedding': np.ones((4096, 2048), np.float32)},
        }
      },
    )
  pod = AbstractMesh((4, 2), ('data', 'model'))
  abstract = {
    'fc': {'kernel': jax.ShapeDtypeStruct(shape, np.float32, sharding=NamedSharding(pod, P('data', 'model')))},
    'embed': {'embedding': jax.ShapeDtypeStruct((4096, 2048), np.float32)},
  }  # no sharding: replicated
  rules = {'Dense_0': 'fc', 'Embed_0': 'embed'}
  limit = 40 * 2**20
  with pytest.warns(
    orbax_linen_nnx.LinenCompatWarning,
    match=r'above max_over_read=4 for fc/kernel \(16.0 MiB decoded for 2.0 MiB, 8.0x\)',
  ):
    orbax_linen_nnx.plan(item, abstract, rules=rules, processes=8)
  with pytest.raises(orbax_linen_nnx.PlanError) as e:
    orbax_linen_nnx.plan(item, abstract, rules=rules, processes=8, strict_cost=True, host_memory_limit_bytes=limit)
  message = str(e.value)
  assert '3 cost problem(s)' in message and 'processes 0-7 each decode' in message, message
  assert "'embed/embedding' (32.0 MiB) gives no sharding: replicated" in message, message
  assert 'fc/kernel (16.0 MiB decoded for 2.0 MiB, 8.0x)' in message, message
  assert 'host_memory_limit_bytes=41943040' in message and 'pass read_budget_bytes=' in message, message
  # The fixes: a sharding for the replicated leaf; the budget the message proposes; the over-read accepted
  # (the checkpoint's one chunk is what it is; convert would rechunk it).
  budget = int(message.split('pass read_budget_bytes=')[1].split()[0])
  abstract['embed']['embedding'] = jax.ShapeDtypeStruct(
    (4096, 2048), np.float32, sharding=NamedSharding(pod, P('data', 'model'))
  )
  plan = orbax_linen_nnx.plan(
    item,
    abstract,
    rules=rules,
    processes=8,
    strict_cost=True,
    max_over_read=8,
    host_memory_limit_bytes=limit,
    read_budget_bytes=budget,
  )
  assert max(p.host_bound_bytes for p in plan.cost.processes) <= limit


def test_a_save_states_what_each_process_writes(mesh):
  """LinenCompatSave's plan says what each process writes: here every Linen array once, by the one process;
  simulated over 4 processes, the sharded arrays split evenly and each replicated one is written once."""
  state = make_bn_drop()
  abstract = models.shard_abstract(nnx.state(state), mesh, 'two_axes')
  placed = jax.tree.map(lambda a, s: jax.device_put(a, s.sharding), nnx.state(state), abstract)
  args = orbax_linen_nnx.LinenCompatSave(placed, rules=models.DROP_RULES)
  total = sum(plans.nbytes(r.target.shape, r.target.dtype) for r in args.plan.reads)
  mine = args.plan.cost.of(0)
  assert mine.written_bytes == total and mine.devices == 8 and mine.device_extra_bytes == 0
  assert f'process 0 (8 devices): writes {plans.size_text(total)}' in str(args.plan)
  pod = AbstractMesh((4, 2), ('data', 'model'))
  on_pod = {
    n: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(pod, v.sharding.spec))
    for n, v in save_lib.nnx_values(placed).items()
  }
  four = save_lib.save_cost(args.plan, on_pod, cost_lib.Topology(4))
  assert sum(p.written_bytes for p in four.processes) == total
  assert len(four.processes) == 4 and {p.devices for p in four.processes} == {2}
  assert four.of(0).written_bytes > four.of(1).written_bytes  # the replicated arrays: process 0 writes them
