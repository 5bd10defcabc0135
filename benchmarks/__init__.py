"""fp8coat's benchmarks, run from the repository root as ``python -m benchmarks.<name>``: ``bench_optimizer``
(optimizer step), ``bench_layers`` (FP8 linear, decoder layer, 4-layer model), ``optimizer_state_error`` (FP8
optimizer-state error study) and ``report`` (the tables of ``docs/benchmarks.md`` from ``docs/results/``).
``harness`` is their shared timing and bookkeeping helper."""
