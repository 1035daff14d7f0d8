"""The Fisher-estimation benchmark (run it as ``python benchmarks/bench_fisher.py``), one job per module,
in the order the data flows:

    configs.py     one declarative entry per workload: model, data, N, subsets, the issue's goals
    workloads.py   an entry turned into the model and the batches every method sees, on the device
    methods.py     the timed methods (fishkern, fishkern-nocheck, loop, vmap, backpack, floor), the check of scores
    load.py        the machine's load: reference workload, waiting for quiet, re-running disturbed calls
    timing.py      one workload: warm-up, CUDA memory, timed rounds, summaries, checks, ratios
    memory.py      CPU memory: one fresh child process per (workload, method), leak vs retention
    goals.py       the goals' verdicts from the measured ratios
    profiling.py   a torch.profiler and cProfile of one fishkern call
    render.py      the markdown report
    cli.py         the options and the run

Needs ``benchmarks/`` on sys.path (for ``_common``), as bench_fisher.py sets it up.
"""
