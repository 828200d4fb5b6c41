"""The benchmark harness and the `fastattn-bench` command.

    fastattn-bench --op all --out bench-out          # console script
    python -m fastattn.bench --op attention --quick   # the same

Modules: counting (FLOP/byte formulas of TARGETS.md), timing (CUDA-event and CPU
timers), ceilings (matmul and copy), spec + specs/ (per op: sweeps, inputs, fp32
reference, providers), harness (check then time), results (JSON Lines, Markdown),
plots (PNG), run (one whole run), report (the README's results section), suite
(pytest-benchmark glue), cli. Importing this package does no work.
"""
