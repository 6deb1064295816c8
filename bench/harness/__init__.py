"""Shared pieces of the scripts in bench/: timers and peak memory (`timing`), the attention
microbenchmark (`attention`). Scripts put bench/ on sys.path and import `harness.*`; nothing in the
product (engine, kernels, export, cones2_train) or in tests/ imports this package."""
