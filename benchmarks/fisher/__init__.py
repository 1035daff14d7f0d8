"""The Fisher-estimation benchmark (run it as ``python benchmarks/bench_fisher.py``), one job per module,
in the order the data flows:

    workloads.py   the models and the batches every method sees, on the device
    methods.py     the timed methods (fishkern, fishkern-nocheck, loop, vmap, floor) and the check of scores
    load.py        the machine's load: reference workload, waiting for quiet, re-running disturbed calls
    timing.py      one workload: warm-up, CUDA memory, timed rounds, summaries, checks, ratios
    memory.py      CPU memory: one fresh child process per (workload, method), leak vs retention
    profiling.py   a torch.profiler and cProfile of one fishkern call
    render.py      the markdown report
    cli.py         the options and the run

Needs ``benchmarks/`` on sys.path (for ``_common``), as bench_fisher.py sets it up.
"""
