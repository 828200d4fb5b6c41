"""The benchmark harness and the `fastattn-bench` command.

    fastattn-bench --op all --out bench-out          # console script
    python -m fastattn.bench --op attention --quick   # the same

Modules: counting (FLOP/byte formulas of TARGETS.md), timing (CUDA-event and CPU
timers), ceilings (matmul and copy), spec + specs/ (per op: sweeps, inputs, fp32
reference, providers), harness (check then time), results (JSON Lines, Markdown),
plots (PNG), run (one whole run, presets), report (the README's results section and
the publishing of a device run), suite (pytest-benchmark glue), cli; for
benchmarks/device_run.sh: smoke (the correctness smoke matrix and its runner),
device_run (its environment and autotune steps), pytest_jsonl (a pytest plugin that
writes one JSON line per test). Importing this package does no work.
"""
