"""Every private name of JAX and Orbax this package touches, each with why and its public alternative.

No version cap protects these: when JAX or Orbax moves, this is the module to
re-check. Each hook degrades to the public behaviour where the private name is
gone (the tests say which behaviour is then lost).
"""

from __future__ import annotations

from typing import Any, Callable


def refuse_as_jax_value(cls: type, fail: Callable[[Any], Any]) -> bool:
  """Makes JAX call `fail(x)` wherever it would turn an `x` of `cls` into a JAX value.

  `cls` subclasses `jax.ShapeDtypeStruct` (a leaf that still describes its
  array), so JAX would otherwise take it as an abstract value in `jit` or
  `eval_shape`, and `device_put` and `jnp` functions would raise JAX's own
  "is not a valid JAX type", which names neither the leaf nor the fix. JAX
  offers no public registry of value types (`__jax_array__` is no longer
  honoured during abstractification), so the two private ones are used:
  `core.pytype_aval_mappings` (abstractification: `jit`, `vmap`, `grad`, `jnp`
  functions, `eval_shape`) and the value canonicalisation handlers (argument
  transfer: `jit` dispatch, `device_put`). Returns whether both were found.
  """
  found = 0
  try:
    from jax._src import core

    core.pytype_aval_mappings[cls] = fail
    found += 1
  except (ImportError, AttributeError):
    pass
  try:
    from jax._src import dtypes

    dtypes.register_canonicalize_value_handler(cls, fail)
    found += 1
  except (ImportError, AttributeError):
    pass
  return found == 2
