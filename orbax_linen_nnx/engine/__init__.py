"""The engine: the checkpoint and the target as they are (`source`, `target`), the one place that
opens a checkpoint and plans (`prepare`), TensorStore reads and writes of exactly the shards needed (`read`,
`write`), agreement across processes (`outcome`), and the one module that touches Orbax's and JAX's
internals (`_internals`)."""
