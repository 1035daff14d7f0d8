"""Synchronous data-parallel FISH training (issue 11): masked optimizers under DistributedDataParallel
and FSDP2, the masked DDP communication hook, on 2 and 3 real gloo processes.

The ranks run tests/distributed/_ddp_worker.py: the same model, the same initial weights, a global batch of 12
split evenly, a few steps; rank 0 also runs the single-process reference on the whole batch.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from _multiproc import launch

WORKER = Path(__file__).with_name("_ddp_worker.py")

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with gloo is not available in this torch build",
)

# run name -> (optimizer, micro-batches) of its single-process reference
HOOK_RUNS = ["hook", "hook_free", "hook_free_copies", "hook_free_small_buckets", "register", "accum_hook_free", "sgd_hook_free",
             "opt_after_ddp_free", "ckpt_hook_free", "static_hook_free", "unused_hook_free"]
PLAIN_RUNS = ["plain", "plain_free", "plain_free_view", "accum_plain", "accum_plain_free", "sgd_plain",
              "ckpt_plain_free", "warmup_then_ddp_free", "rewrap_free"]
FREE_RUNS = [n for n in PLAIN_RUNS + HOOK_RUNS if "free" in n]


def ref_key(name: str) -> str:
    return f"{'sgd' if name.startswith('sgd') else 'adamw'}-{2 if name.startswith('accum') else 1}"


def dense_ddp_twin(name: str) -> str:
    """The run with DDP's own all-reduce and the same optimizer and accumulation."""
    if name.startswith("sgd"):
        return "sgd_plain"
    return "accum_plain" if name.startswith("accum") else "plain"


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    res, _ = launch(WORKER, tmp_path_factory.mktemp("ddp2"), 2, "equivalence,fsdp,mismatch,ddp_then_free,one_rank_refuses",
                    limit=400)
    return res


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    res, _ = launch(WORKER, tmp_path_factory.mktemp("ddp3"), 3, "equivalence", limit=300)
    return res


def _close(a: dict, b: dict, atol: float) -> float:
    worst = max((a[n] - b[n]).abs().max().item() for n in a)
    assert worst <= atol, f"max difference {worst:.3g} > {atol}"
    return worst


@pytest.mark.parametrize("name", PLAIN_RUNS + HOOK_RUNS)
def test_ddp_matches_one_process_over_the_global_batch(two, name):
    """Parameters and the gradients the optimizer used equal the single-process run within fp32
    rounding of the reduction order — with and without free_dense_grads, with no_sync accumulation."""
    run, ref = two[0]["runs"][name], two[0]["reference"][ref_key(name)]
    _close(run["final"], ref["final"], 1e-6)
    for step, (g, g_ref) in enumerate(zip(run["grads"], ref["grads"])):
        assert (g - g_ref).abs().max().item() <= 1e-7, f"step {step}: the optimizer used another gradient"


@pytest.mark.parametrize("name", FREE_RUNS)
def test_free_dense_grads_gathers_the_reduced_gradient(two, name):
    """The bug of issue 11: with free_dense_grads the hook gathered the local gradient before DDP's
    all-reduce. Now it is bit-identical to gathering at step() from DDP's reduced .grad — also with
    reentrant checkpointing (nested backward passes), a backward before DDP existed, a new DDP
    module mid-training, static_graph and find_unused_parameters."""
    run, dense = two[0]["runs"][name], two[0]["runs"][dense_ddp_twin(name)]
    for a, b in zip(run["grads"], dense["grads"]):
        assert torch.equal(a, b)
    for n in run["final"]:
        assert torch.equal(run["final"][n], dense["final"][n]), n
    assert run["dense_grads_left_after_step"] == []  # and the dense .grad was still freed


@pytest.mark.parametrize("name", HOOK_RUNS)
def test_masked_hook_is_bit_identical_to_dense_ddp_on_two_ranks(two, name):
    run, dense = two[0]["runs"][name], two[0]["runs"][dense_ddp_twin(name)]
    for n in run["final"]:
        assert torch.equal(run["final"][n], dense["final"][n]), n


@pytest.mark.parametrize("world", [2, 3])
def test_unmasked_entries_and_ranks(two, three, world):
    """Every entry outside the mask stays bit-identical on every rank; all ranks end equal."""
    res = two if world == 2 else three
    for name in res[0]["runs"]:
        runs = [res[r]["runs"][name] for r in range(world)]
        mask = runs[0]["mask"]
        for n, init in runs[0]["init"].items():
            keep = torch.ones(init.numel(), dtype=torch.bool)
            if n in mask:
                keep[mask[n].long()] = False
            for r, run in enumerate(runs):
                assert torch.equal(run["final"][n].reshape(-1)[keep], init.reshape(-1)[keep]), (name, n, r)
                assert torch.equal(run["final"][n], runs[0]["final"][n]), (name, n, r)


@pytest.mark.parametrize("world", [2, 3])
def test_bytes_per_step_are_4k(two, three, world):
    """Counted at torch.distributed.all_reduce during backward: 4·k bytes per step per rank
    (2·k in bf16); the no_sync micro-batch sends nothing; DDP's dense bucket bytes for comparison."""
    res = two if world == 2 else three
    for r in range(world):
        for name in HOOK_RUNS + ["hook_bf16"]:
            run = res[r]["runs"][name]
            per_entry = 2 if name == "hook_bf16" else 4
            assert run["sent"] == [per_entry * run["k_trainable"]] * len(run["sent"]), (name, run["sent"])
            stats = run["hook_stats"]
            assert stats["bytes_sent"] == sum(run["sent"])
            trainable_numel = sum(v.numel() for n, v in run["init"].items() if run["requires_grad"][n])
            assert stats["dense_bytes"] == 4 * trainable_numel * len(run["sent"])
            if name != "register":  # (the worker froze it itself for the DDP it built)
                assert not run["requires_grad"]["frozen.weight"]  # k = 0: frozen before DDP buckets


def test_three_ranks_match_one_process(three):
    for name in PLAIN_RUNS + HOOK_RUNS:
        run, ref = three[0]["runs"][name], three[0]["reference"][ref_key(name)]
        _close(run["final"], ref["final"], 1e-6)
        _close(run["final"], three[0]["runs"][dense_ddp_twin(name)]["final"], 1e-6)


def test_bf16_hook_is_close(two):
    run, ref = two[0]["runs"]["hook_bf16"], two[0]["reference"]["adamw-1"]
    worst = _close(run["final"], ref["final"], 2e-3)
    assert worst > 0  # it really sent bfloat16


@pytest.mark.parametrize("name", ["fsdp", "fsdp_free", "fsdp_clip", "fsdp_sgd"])
def test_fsdp2_matches_one_process(two, name):
    """MaskedAdamW/SGD over FSDP2's DTensor shards: each rank holds the state of its own shard's
    masked entries, the results equal one process (also clip_grad_norm_ across the shards)."""
    runs = [two[r]["fsdp"][name] for r in range(2)]
    ref = two[0]["fsdp_reference"][name]
    _close(runs[0]["final"], ref["final"], 1e-6)
    assert all(torch.equal(runs[0]["final"][n], runs[1]["final"][n]) for n in ref["final"])
    assert runs[0]["k_local"] + runs[1]["k_local"] == ref["k_local"] == ref["k"]
    assert runs[0]["state_bytes"] + runs[1]["state_bytes"] == ref["state_bytes"]
    for a, b in zip(runs[0]["norms"], ref["norms"]):
        assert abs(a - b) <= 1e-6 * max(1.0, abs(b))
    assert len(runs[0]["norms"]) == (len(ref["norms"]))
    if name == "fsdp_free":  # FSDP2 hands over the reduced shard in the hook: freed during backward
        assert runs[0]["dense_grads_after_backward"] == [] and runs[1]["dense_grads_after_backward"] == []
    else:
        assert runs[0]["dense_grads_after_backward"] != []


def test_mask_mismatch_is_refused_on_every_rank(two):
    for r in range(2):
        kind, msg = two[r]["mismatch"]
        assert kind == "MaskMismatchError" and "different masks" in msg and "rank 0" in msg and "rank 1" in msg


def test_freezing_a_parameter_ddp_already_reduces_is_refused(two):
    msg = two[0]["ddp_then_free"]
    assert msg is not None and "DistributedDataParallel module already reduces it" in msg and "masked_ddp" in msg


@pytest.mark.parametrize("scenario", ["die", "hang"])
def test_a_dead_or_missing_rank_is_a_clear_error_in_time(tmp_path, scenario):
    """Rank 1 exits (die) or never arrives (hang); rank 0's backward raises an error naming the
    masked hook within the process group's 5 s timeout."""
    res, _ = launch(WORKER, tmp_path, 2, scenario, wait_for=[0], limit=90, env={"FISHKERN_TEST_TIMEOUT": "5"})
    err = res[0][scenario]
    assert err is not None, "the backward returned although a rank was missing"
    kind, msg = err
    assert "masked_allreduce_hook" in msg and "failed on this rank" in msg
    assert res[0][f"{scenario}_seconds"] < 30


@pytest.mark.parametrize("case,kinds", [
    ("refuse_few_samples", ("ValueError", "ValueError")),
    ("refuse_empty_data", ("DistributedError", "ValueError")),
    ("refuse_nan", ("ValueError", "DistributedError")),
    ("refuse_masked_ddp", ("DistributedError", "ValueError")),
    ("refuse_settings", ("MaskMismatchError", "MaskMismatchError")),
])
def test_a_refusal_on_one_rank_reaches_every_rank_at_once(two, case, kinds):
    """fisher_mask_distributed (too few samples, one rank's data empty, NaN scores from one rank)
    and masked_ddp (a mask that does not fit one rank's model, another dtype on one rank): every
    rank raises within seconds, none waits for the timeout."""
    for r in range(2):
        kind, msg, seconds = two[r][case]
        assert kind == kinds[r], (r, kind, msg)
        assert seconds < 10, (r, seconds)
