"""Each op against numpy: the boxes it needs, and what it computes from them, on every kind of slice."""

import itertools

import numpy as np
import pytest

from orbax_linen_nnx import ops

X = np.arange(4 * 3 * 5, dtype=np.float32).reshape(4, 3, 5)


def boxes(shape):
  """A few boxes per axis: whole, leading part, trailing part, one element, empty."""
  per_axis = [[(0, n), (0, max(1, n // 2)), (n // 2, n), (n - 1, n), (1, 1)] for n in shape]
  return list(itertools.product(*per_axis))


def run(op, inputs, box):
  """What the reader does: read only the boxes `op` needs, then apply it."""
  needs = op.needs(box, [x.shape for x in inputs])
  assert len(needs) == len(inputs)
  parts = []
  for x, b in zip(inputs, needs):
    if b is None:
      continue
    assert all(0 <= lo <= hi <= n for (lo, hi), n in zip(b, x.shape)), (b, x.shape)
    parts.append(x[tuple(slice(*r) for r in b)])
  return op.apply(box, parts), needs


CASES = [
  (ops.Reshape((4, 3, 5), (4, 15)), lambda x: x.reshape(4, 15)),
  (ops.Reshape((4, 3, 5), (12, 5)), lambda x: x.reshape(12, 5)),
  (ops.Reshape((4, 3, 5), (2, 2, 15)), lambda x: x.reshape(2, 2, 15)),
  (ops.Reshape((4, 3, 5), (60,)), lambda x: x.reshape(60)),
  (ops.Transpose((2, 0, 1)), lambda x: x.transpose(2, 0, 1)),
  (ops.MoveAxis(2, 0), lambda x: np.moveaxis(x, 2, 0)),
  (ops.Take(1, 2), lambda x: x[:, 2]),
  (ops.Slice(2, 1, 4), lambda x: x[:, :, 1:4]),
  (ops.Cast(np.float32, np.float16), lambda x: x.astype(np.float16)),
]


@pytest.mark.parametrize('case', range(len(CASES)))
def test_single_input_ops(case):
  op, reference = CASES[case]
  want = reference(X)
  assert op.shape([X.shape]) == want.shape
  assert op.out_dtype([X.dtype]) == want.dtype
  for box in boxes(want.shape):
    got, _ = run(op, [X], box)
    np.testing.assert_array_equal(got, want[tuple(slice(*r) for r in box)])
    assert got.dtype == want.dtype


def test_multi_input_ops_read_only_the_inputs_they_need():
  y = X + 100
  for op, want in ((ops.Stack(1), np.stack([X, y], 1)), (ops.Concat(2), np.concatenate([X, y], 2))):
    assert op.shape([X.shape, y.shape]) == want.shape
    for box in boxes(want.shape):
      if any(lo == hi for lo, hi in box):
        continue  # the reader makes empty slices without ops
      got, needs = run(op, [X, y], box)
      np.testing.assert_array_equal(got, want[tuple(slice(*r) for r in box)])
  # A box inside the first input never touches the second.
  assert ops.Concat(2).needs(((0, 4), (0, 3), (0, 5)), [X.shape, y.shape])[1] is None
  assert ops.Stack(0).needs(((1, 2), (0, 4), (0, 3), (0, 5)), [X.shape, y.shape])[0] is None


def test_reshape_needs_the_smallest_covering_rows():
  # (D, H, K) = (4, 3, 5) -> (4, 15): columns 5..9 are head 1 only.
  assert ops.Reshape((4, 3, 5), (4, 15)).needs(((0, 2), (5, 10)), [(4, 3, 5)]) == [((0, 2), (1, 2), (0, 5))]


def assemble(op, inputs, box, dtype):
  """What the reader does for ops that move elements as they are: copy each input box into its region."""
  out = np.full([hi - lo for lo, hi in box], -1, dtype)
  shapes = [x.shape for x in inputs]
  for x, b, region in zip(inputs, op.needs(box, shapes), op.regions(box, shapes)):
    if b is not None:
      region(out)[...] = x[tuple(slice(*r) for r in b)]
  return out


@pytest.mark.parametrize('case', [c for c in range(len(CASES)) if not isinstance(CASES[c][0], ops.Reshape)])
def test_regions_assemble_the_output_in_place(case):
  op, reference = CASES[case]
  want = reference(X)
  for box in boxes(want.shape):
    got = assemble(op, [X], box, want.dtype)
    np.testing.assert_array_equal(got, want[tuple(slice(*r) for r in box)])


def test_regions_of_multi_input_ops_and_reshape():
  y = X + 100
  for op, want in ((ops.Stack(1), np.stack([X, y], 1)), (ops.Concat(2), np.concatenate([X, y], 2))):
    for box in boxes(want.shape):
      np.testing.assert_array_equal(assemble(op, [X, y], box, X.dtype), want[tuple(slice(*r) for r in box)])
  assert ops.Reshape((4, 3, 5), (4, 15)).regions(((0, 4), (0, 15)), [X.shape]) == [None]


def test_every_op_is_interpreted_everywhere_or_declared_absent():
  """The three interpreters of a plan's ops: each op's own host `apply` (and its boxes), a TensorStore view
  (read.VIEWS, or read.NO_VIEW where none exists), and a jax computation on device (save.ON_DEVICE)."""
  from orbax_linen_nnx import read, save

  for op in ops.ALL:
    for method in ('shape', 'needs', 'apply', 'regions', 'lifted', '__str__'):
      assert method in vars(op), (op.__name__, method)
    assert (op in read.VIEWS) != (op in read.NO_VIEW), op.__name__
    assert op in save.ON_DEVICE, op.__name__
  assert set(read.VIEWS) | set(read.NO_VIEW) == set(save.ON_DEVICE) == set(ops.ALL)


def _where_axes_go(op, shapes):
  """Where each axis of input 0 goes in the output, read off `image`: {input axis: output axis, or None (gone)}."""
  full = tuple((0, n) for n in shapes[0])
  whole = op.image(full, 0, shapes)  # where all of input 0 lands (a stack: one entry of the new axis)
  went = {}
  for i, n in enumerate(shapes[0]):
    for k in range(n):  # an element the op uses (a slice or a take uses only some)
      image = op.image(full[:i] + ((k, k + 1),) + full[i + 1 :], 0, shapes)
      if image is not None:
        narrowed = [j for j, (a, b) in enumerate(zip(image, whole)) if a != b]
        went[i] = narrowed[0] if narrowed else None
        break
  return went


def test_every_op_states_its_sharding_rule_and_it_moves_entries_as_its_boxes_move():
  """`spec` is where a save's sharding comes from (save.carried): an op moving an axis must move that axis's
  PartitionSpec entry exactly where `image` sends its elements, or a shard would be recorded where it is not."""
  for cls in ops.Op.__subclasses__():
    assert 'spec' in cls.__dict__, f'{cls.__name__} states no sharding rule'
  y = X + 100
  cases = [op for op, _ in CASES] + [ops.Stack(1), ops.Concat(2)]
  for op in cases:
    shapes = [X.shape] if op not in (ops.Stack(1), ops.Concat(2)) else [X.shape, y.shape]
    labels = [f'axis{i}' for i in range(X.ndim)]
    spec = op.spec([labels] * len(shapes))
    if not op.moves_boxes:
      assert spec is None, op  # laid out anew, never carried
      continue
    assert len(spec) == len(op.shape(shapes)), op
    for i, j in _where_axes_go(op, shapes).items():
      if j is None:
        assert labels[i] not in spec, (op, spec)
      else:
        assert spec[j] == labels[i], (op, i, j, spec)
    # Axes no input had (a stacked axis) are laid out whole.
    assert sum(e is None for e in spec) == len(op.shape(shapes)) - len([e for e in spec if e]), op
