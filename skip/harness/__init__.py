"""The harness around the methods: benchmarks, evaluations, the demo, data and task loaders,
plots. It imports the methods in skip/; no method imports it."""
