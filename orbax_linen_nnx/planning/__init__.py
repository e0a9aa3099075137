"""The plan: pure data and the code that makes it (pairing, rules, ops, layer stacks, costs,
diagnostics, options). No IO and no TensorStore: `engine.prepare` opens what is planned here."""
