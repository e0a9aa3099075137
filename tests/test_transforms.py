"""Each transform, as a TensorStore view and as a host fallback, against numpy on every kind of slice."""

import asyncio
import itertools

import numpy as np
import pytest
import tensorstore as ts

from orbax_linen_nnx import transforms as T

X = np.arange(4 * 3 * 5, dtype=np.float32).reshape(4, 3, 5)


def slices(shape):
  """A few slices per axis: whole, leading part, trailing part, one element."""
  per_axis = [[slice(0, n), slice(0, max(1, n // 2)), slice(n // 2, n), slice(n - 1, n)] for n in shape]
  return list(itertools.product(*per_axis))


async def lazy(host: bool) -> T.Lazy:
  src = T.TsLazy(ts.array(X))
  # A no-op reshape forces every op above it onto the host path.
  return await T.build(T.Reshape(X.shape, X.shape), [src]) if host else src


CASES = [
    (lambda: T.Reshape((4, 3, 5), (4, 15)), lambda x: x.reshape(4, 15)),
    (lambda: T.Reshape((4, 3, 5), (12, 5)), lambda x: x.reshape(12, 5)),
    (lambda: T.Reshape((4, 3, 5), (2, 2, 15)), lambda x: x.reshape(2, 2, 15)),
    (lambda: T.Reshape((4, 3, 5), (60,)), lambda x: x.reshape(60)),
    (lambda: T.Transpose((2, 0, 1)), lambda x: x.transpose(2, 0, 1)),
    (lambda: T.MoveAxis(2, 0), lambda x: np.moveaxis(x, 2, 0)),
    (lambda: T.Take(1, 2), lambda x: x[:, 2]),
    (lambda: T.Slice(2, 1, 4), lambda x: x[:, :, 1:4]),
    (lambda: T.Cast(np.float32, np.float16), lambda x: x.astype(np.float16)),
]


@pytest.mark.parametrize('host', [False, True])
@pytest.mark.parametrize('case', range(len(CASES)))
def test_single_input_ops(case, host):
  make_op, reference = CASES[case]

  async def run():
    out = await T.build(make_op(), [await lazy(host)])
    want = reference(X)
    assert out.shape == want.shape and np.dtype(out.dtype) == want.dtype
    for index in slices(want.shape):
      np.testing.assert_array_equal(await out.read(index), want[index])
  asyncio.run(run())


@pytest.mark.parametrize('host', [False, True])
def test_multi_input_ops(host):
  async def run():
    a = await lazy(host)
    stack = await T.build(T.Stack(1), [a, a])
    concat = await T.build(T.Concat(2), [a, a])
    for out, want in ((stack, np.stack([X, X], 1)), (concat, np.concatenate([X, X], 2))):
      for index in slices(want.shape):
        np.testing.assert_array_equal(await out.read(index), want[index])
  asyncio.run(run())


def test_views_stay_views():
  async def run():
    src = T.TsLazy(ts.array(X))
    out = await T.build(T.Transpose((1, 0, 2)), [await T.build(T.Slice(0, 1, 3), [src])])
    assert isinstance(out, T.TsLazy)  # no host step: reads go to the chunks directly
    reshaped = await T.build(T.Reshape((4, 3, 5), (4, 15)), [src])
    assert isinstance(reshaped, T.HostLazy)
  asyncio.run(run())
