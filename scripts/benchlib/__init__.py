"""`scripts/bench`: every figure of issue 4 next to its peer, measured in the same run.

    common.py       the run context, timing, medians, machine facts, peer tools (uv, nginx)
    workload.py     w31 (fetched once into a cache outside the repo), smoke wheels, big blobs
    materialise.py  figure 1: satellite cold/warm/re-flip vs uv (cold/warm cache) and pip
    transfer.py     figure 2: satellite pull vs nginx+curl, peak RSS; chunk-size sweep; delta (3)
    fanout.py       figure 4: 200 agents in a few processes, core RSS per idle subscription
    install.py      figure 5: core install vs `pip download` from the same local index
    sandbox.py      figure 6: sandboxed vs unsandboxed `spk-satellite run` start-up (issue 16),
                    and the bare mechanisms (bwrap one/two layers, unshare + prlimit)
    report.py       the table printed and written to docs/benchmarks.md

Not run in CI; `--smoke` (tiny synthetic wheels, one round, no uv/nginx/PyPI) is, by
tests/test_bench_smoke.py, so this keeps working.
"""
