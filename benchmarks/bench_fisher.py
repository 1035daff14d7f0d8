"""Fisher-estimation benchmark: time and peak memory of five ways to compute the diagonal empirical
Fisher F = sum_n (d loss_n / d theta)^2 over the same N samples, side by side in one run.

Methods (every one sees the same pre-built batches, already on the device):

1. fishkern    fishkern.fisher.estimate_fisher(model, batches, N, implementation="auto"): batched
               exact per-sample squared gradients (PyTorch rules on CPU, Triton kernel on CUDA).
               Where estimate_fisher has the option, a second row times it with self_check=False
               (no first-batch comparison with the per-sample loop), to show what the check costs.
2. loop        estimate_fisher(..., implementation="loop"): the original algorithm, one forward and
               one backward per sample (batch size 1), squared gradients summed. On CUDA it may run
               on a subset (--loop-samples, default 128) and its time is extrapolated linearly to N.
3. vmap        torch.func: functional_call + vmap(grad(per-sample loss)) over chunks of samples
               (--vmap-chunk): per-sample gradients of every parameter are materialised, squared in
               place and summed (written here, not part of fishkern). HF BERT models run it with
               eager attention (--vmap-attn): torch has no vmap batching rule for the CPU
               flash-attention kernel behind SDPA, which makes it ~5x slower, and transformers' SDPA
               mask helper calls .all() on the mask (data-dependent, refused under vmap), so the
               attention mask is handed over pre-expanded to 4-D. Its scores are checked against
               fishkern's: max over parameters of max|vmap - fishkern| / max(fishkern_p),
               the denominator floored at 1e-8 x the global max score. The loop is checked the same way.
4. backpack   BackPACK's SumGradSquared extension (backpack-for-pytorch, where it is installed: it
               is not a fishkern dependency), on a deep copy of the model extended with
               ``extend(copy, use_converter=True)`` (per module where torch.fx cannot trace the
               model), loss with reduction="sum" so its sum of squared per-sample gradients is the
               same Fisher. Where BackPACK has no extension for a module holding a parameter
               (e.g. LayerNorm), the row says "not run" and why. Checked against fishkern's scores.
5. floor       a plain batched forward + backward over the same N samples (model.eval(), parameters
               requiring grad, model.zero_grad() between batches): what one training epoch over the
               samples costs, the lower bound any Fisher method is compared with.

fishkern's self-check runs once per model structure per process (then cached); the benchmark
clears that cache before every fishkern call, so each timed call includes the check.

Workloads: one entry each in benchmarks/fisher/configs.py (model, data, N, batch, the subsets the
slow methods run on, and the issue's goals, whose verdicts the report prints).
    CPU (default without CUDA):
      minilm-vader      all-MiniLM-L6-v2 (fishkern.data.minilm_path()) as
                        AutoModelForSequenceClassification(num_labels=2); N=256 real words from the
                        VADER lexicon (fishkern.data.load_vader() train split, in split order),
                        MiniLM tokenizer, max_length 16, batches of 32 with trim_padding=True,
                        VADER labels. Real text, but single words: 3-7 tokens per sample.
      minilm-synth-t64  the same model, SYNTHETIC input: N=128 sequences of 64 uniformly random
                        token ids (no padding), random labels, batches of 32.
      minilm-synth-t128 the same with 128 tokens per sample.
      resnet34-cifar    ResNet-34 for CIFAR (fishkern.models.resnet34_cifar), eval mode, N=256
                        random 3x32x32 images, random labels, batches of 64.
    CUDA (default with CUDA, or --device cuda):
      bert-large        BertForSequenceClassification BERT-large, random init (benchmarks/_common.py),
                        N=1024, 128 random token ids per sample (no padding), batches of 32.
      resnet34          ResNet-34 for CIFAR (fishkern.models.resnet34_cifar), N=1024 random
                        3x32x32 images, random labels, batches of 128.
    The loop, vmap and BackPACK run on a subset of N on some workloads (configs.py; --loop-samples,
    --vmap-samples, --backpack-samples), their times extrapolated linearly to N and marked *.

Timing: each method is warmed up once on a small N (one batch; the loop 4 samples; vmap one chunk),
then timed --reps times (fishkern, floor) or --slow-reps times (loop, vmap, backpack), the methods interleaved
round by round. CPU: time.perf_counter around the call; CUDA: torch.cuda.synchronize() before and
after it. The machine may be shared: before each call the script waits (up to --quiet-wait s) for
other processes to leave the CPU, records the CPU time other processes used during it
(/proc/stat), the load average, and a fixed reference workload (a 1024x1024 fp32 matmul) before and
after each method; a call during which other processes used over 10% of a core is re-run (up to
--retries times) and marked as disturbed if it stays so.

Memory: CUDA: torch.cuda.max_memory_allocated() minus memory_allocated() before the call (after a
warm-up), in this process. CPU: one fresh subprocess per (workload, method): it builds the model and
the data, runs a common 2-sample forward+backward warm-up (to page in the code), then records the
growth of the peak resident set size over the call (VmHWM after, reset before, minus VmRSS before).
Every figure includes what the method returns (fp32 scores, or the floor's .grad: one model's worth).
Also reported: the tensor memory still allocated after the call returned and its result was dropped
(nonzero = a leak). Leak or allocator retention: in the same fresh process, fishkern and the floor
are then called --memory-repeats more times; after each call (result dropped, gc.collect()) the
script records VmRSS, VmRSS after glibc's malloc_trim(0) (which hands freed heap memory back to the
OS), and the live tensor bytes. A leak grows all three linearly with the calls; memory the allocator
merely keeps (freed, not returned) shows up in the first figure only, and disappears with the trim.

Usage:
    python benchmarks/bench_fisher.py                 # full run (CUDA workloads if CUDA is available)
    python benchmarks/bench_fisher.py --quick         # each workload's quick N, no memory subprocesses
    python benchmarks/bench_fisher.py --workloads minilm-vader --skip-memory --reps 3

Writes benchmarks/results/fisher_<device>[_quick].{md,json}.

The code is in benchmarks/fisher/ (configs, workloads, methods, load, timing, memory, goals, profiling, render, cli:
see its __init__); this file is the entry point, also of the memory child processes (--child).
"""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
if str(REPO) not in sys.path:
    sys.path.insert(1, str(REPO))

from fisher.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
