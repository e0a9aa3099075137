"""Model code this project did not write, installed from PyPI as test dependencies (the `corpus` extra).

- Hugging Face `transformers` 4.x: `FlaxLlamaForCausalLMModule`, a Linen model with setup-style names and
  numbered sub-dicts (`model/layers/0/self_attn/q_proj/kernel`, (D, N*H) kernels).
- Google's `tunix`: `Llama3`, an NNX port of the same architecture (`layers/0/attn/q_proj/w`, (D, N, H)
  einsum weights, an `nnx.List`-like `ModuleList` of layers). Installed without its dependencies (its
  package `__init__` imports its trainers, whose stack is heavy): `tunix_module` loads the model module
  itself, which needs only flax, jax and jaxtyping.

- `flaxmodels`: its Linen `ResNet18` (custom BatchNorm, `batch_stats`), against a port written here as its
  users write one (ports.ResNet18: one attribute per block, named as the pretrained weights name them).

Each at a small config. `LLAMA_RULES` is the table a user writes between them. This module imports no
orbax_linen_nnx name but the rules, so a reader process can use it without this package
(`hf_logits_main`).
"""

import importlib
import importlib.util
import json
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np

VOCAB, D, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, LAYERS, SEQ = 64, 16, 32, 4, 2, 4, 2, 8
THETA, EPS = 10000, 1e-6


def tunix_module(name: str):
  """`tunix.<name>`, without running `tunix/__init__.py` (see the module docstring)."""
  if 'tunix' not in sys.modules:
    spec = importlib.util.find_spec('tunix')
    pkg = types.ModuleType('tunix')
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules['tunix'] = pkg
  return importlib.import_module(f'tunix.{name}')


def hf_module():
  from transformers import LlamaConfig
  from transformers.models.llama.modeling_flax_llama import FlaxLlamaForCausalLMModule

  config = LlamaConfig(
    vocab_size=VOCAB,
    hidden_size=D,
    intermediate_size=HIDDEN,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    num_key_value_heads=KV_HEADS,
    max_position_embeddings=4 * SEQ,
    rms_norm_eps=EPS,
    rope_theta=float(THETA),
    tie_word_embeddings=False,
  )
  return FlaxLlamaForCausalLMModule(config, dtype=jnp.float32)


def tokens(batch: int = 2, seed: int = 0):
  return jax.random.randint(jax.random.key(seed), (batch, SEQ), 0, VOCAB)


def hf_variables(seed: int = 0):
  ids = tokens()
  return hf_module().init(jax.random.key(seed), ids, jnp.ones_like(ids), positions(ids))


def positions(ids):
  return jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)


def hf_logits(variables, ids):
  return hf_module().apply(variables, ids, jnp.ones_like(ids), positions(ids)).logits


def tunix_llama(seed: int = 0):
  from flax import nnx

  lib = tunix_module('models.llama3.model')
  config = lib.ModelConfig(
    num_layers=LAYERS,
    vocab_size=VOCAB,
    embed_dim=D,
    hidden_dim=HIDDEN,
    num_heads=HEADS,
    head_dim=HEAD_DIM,
    num_kv_heads=KV_HEADS,
    rope_theta=THETA,
    norm_eps=EPS,
  )
  return lib.Llama3(config, rngs=nnx.Rngs(seed))


def tunix_logits(model, ids):
  causal = jnp.tril(jnp.ones((ids.shape[1], ids.shape[1]), bool))[None].repeat(ids.shape[0], 0)
  return model(ids, positions(ids), None, causal)[0]


def llama_rules():
  from orbax_linen_nnx import rearrange, rename

  layer = 'model/layers/{i}'
  return [
    rearrange(f'{layer}/self_attn/q_proj/kernel', 'd (n h) -> d n h', h=HEAD_DIM),
    rearrange(f'{layer}/self_attn/k_proj/kernel', 'd (n h) -> d n h', h=HEAD_DIM),
    rearrange(f'{layer}/self_attn/v_proj/kernel', 'd (n h) -> d n h', h=HEAD_DIM),
    rearrange(f'{layer}/self_attn/o_proj/kernel', '(n h) d -> n h d', h=HEAD_DIM),
    rename(
      {
        'model/embed_tokens/embedding': 'embedder/input_embedding',
        **{f'{layer}/self_attn/{p}_proj/kernel': f'layers/{{i}}/attn/{p}_proj/w' for p in 'qkvo'},
        f'{layer}/mlp': 'layers/{i}/mlp',
        f'{layer}/input_layernorm/weight': 'layers/{i}/input_layernorm/w',
        f'{layer}/post_attention_layernorm/weight': 'layers/{i}/post_attention_layernorm/w',
        'model/norm/weight': 'final_norm/w',
        'lm_head/kernel': 'lm_head/w',
      }
    ),
  ]


# Float32 terms one logit sums along the way (each contraction's inner size, each norm's and softmax's
# mean or sum, per layer), for models.assert_reductions_close.
LOGIT_TERMS = LAYERS * (3 * D + HEAD_DIM + SEQ + HEADS * HEAD_DIM + HIDDEN) + 2 * D


def flaxmodels_resnet():
  from flaxmodels.resnet import resnet

  return resnet.ResNet18(output='logits', pretrained=None, normalize=False, num_classes=CLASSES)


CLASSES, IMAGE = 10, 32


def images(n: int = 4, seed: int = 0):
  return jax.random.uniform(jax.random.key(seed), (n, IMAGE, IMAGE, 3))


def resnet_variables(seed: int = 0):
  return flaxmodels_resnet().init(jax.random.key(seed), images(), train=False)


def resnet_logits(variables, x):
  return flaxmodels_resnet().apply(variables, x, train=False)


# Float32 terms one ResNet18 logit sums (each conv's kernel volume along the deepest path, the pooled mean,
# the classifier's inner size), for models.assert_reductions_close.
RESNET_TERMS = 7 * 7 * 3 + 4 * 9 * 64 + 9 * 64 + 3 * 9 * 128 + 9 * 128 + 3 * 9 * 256 + 9 * 256 + 3 * 9 * 512 + 512


def resnet_logits_main(directory: str, step: int) -> None:
  """A flaxmodels user's own code: restore the variables with plain Orbax, print the logits (JSON)."""
  import orbax.checkpoint as ocp

  with ocp.CheckpointManager(directory) as mngr:
    variables = mngr.restore(step, args=ocp.args.StandardRestore(jax.eval_shape(resnet_variables)))
  print(
    json.dumps(
      {
        'logits': np.asarray(resnet_logits(variables, images())).tolist(),
        'imported_orbax_linen_nnx': 'orbax_linen_nnx' in sys.modules,
      }
    )
  )


def hf_logits_main(directory: str, step: int) -> None:
  """A Hugging Face user's own code: restore the params tree with plain Orbax, print the logits (JSON)."""
  import orbax.checkpoint as ocp

  abstract = jax.eval_shape(hf_variables)
  with ocp.CheckpointManager(directory) as mngr:
    variables = mngr.restore(step, args=ocp.args.StandardRestore(abstract))
  print(
    json.dumps(
      {
        'logits': np.asarray(hf_logits(variables, tokens())).tolist(),
        'imported_orbax_linen_nnx': 'orbax_linen_nnx' in sys.modules,
      }
    )
  )


if __name__ == '__main__':
  jax.config.update('jax_num_cpu_devices', 8)  # the devices the checkpoint was saved from
  {'hf': hf_logits_main, 'resnet': resnet_logits_main}[sys.argv[1]](sys.argv[2], int(sys.argv[3]))
