"""The faces: Orbax v0 args and handler, Orbax v1, `LinenCompatSave` and `to_linen`, and the command
line over `inspection`, `convert` and `compare`. Thin: each builds its options and calls the engine."""
