"""One rank of the distributed tests (tests/distributed/test_distributed.py starts M of these as processes).

    RANK=r WORLD_SIZE=M FISHKERN_TEST_INIT=file:///tmp/.../store python _dist_worker.py SCENARIOS OUT_DIR

SCENARIOS is a comma-separated list of names below; each records tensors / messages into a dict
that is saved to OUT_DIR/rank{r}.pt and checked by the test process against a single-process
reference. Keeps torch to one thread (the test machine has 2 cores shared by all ranks).
"""
from __future__ import annotations

import copy
import os
import sys
import time
import traceback

import torch

torch.set_num_threads(1)

import fishkern  # noqa: E402
from fishkern import FishMask  # noqa: E402
from fishkern.distributed import (  # noqa: E402
    CollectiveTimeoutError,
    ConfigMismatchError,
    DistributedError,
    MaskMismatchError,
    SparseAverager,
    all_gather_masks,
    broadcast_mask,
    init_from_env,
    shutdown,
)

RANK = int(os.environ["RANK"])
WORLD = int(os.environ["WORLD_SIZE"])
SHAPES = ((13, 11), (11, 4))  # Linear(13, 11) -> Tanh -> Linear(11, 4): 202 parameters


def make_model(seed: int = 0, dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(*SHAPES[0]), torch.nn.Tanh(), torch.nn.Linear(*SHAPES[1])
    )
    return model.to(dtype)


def make_mask(model: torch.nn.Module, density: float, seed: int) -> FishMask:
    """A random mask with exactly ⌊density·|θ|⌋ entries, built without the native extension."""
    gen = torch.Generator().manual_seed(seed)
    named = list(model.named_parameters())
    scores = torch.rand(sum(p.numel() for _, p in named), generator=gen)
    k = int(density * scores.numel())
    chosen = torch.zeros(scores.numel(), dtype=torch.bool)
    chosen[torch.topk(scores, k).indices] = True
    masks, at = {}, 0
    for name, p in named:
        masks[name] = chosen[at : at + p.numel()].view(p.shape)
        at += p.numel()
    return FishMask.from_boolean(masks)


def params_of(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def set_params(model, values) -> None:
    with torch.no_grad():
        for p, v in zip(model.parameters(), values):
            p.copy_(v)


def data_for(rank: int, step: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(16, SHAPES[0][0], generator=gen).to(dtype), torch.randint(0, SHAPES[1][1], (16,), generator=gen)


def local_steps(model, opt, rank: int, first: int, n: int) -> None:
    for s in range(first, first + n):
        x, y = data_for(rank, s, next(model.parameters()).dtype)
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


# ---------------------------------------------------------------------------- scenarios
def scenario_exact(out: dict) -> None:
    """Every (mode, op, reduction) from the same start: record values before / after one
    exchange; 'random' data (exact only for reduction='gather' when M > 2) and 'dyadic' data
    (every order of summation is exact)."""
    model = make_model()
    shared = make_mask(model, 0.25, seed=0)
    own = [make_mask(model, 0.2, seed=10 + r) for r in range(WORLD)]
    out["shared_mask"] = shared.to_boolean()
    out["own_masks"] = [m.to_boolean() for m in own]
    results = {}
    for data in ("random", "dyadic"):
        gen0 = torch.Generator().manual_seed(7)
        if data == "random":
            theta0 = [torch.randn(p.shape, generator=gen0) for p in model.parameters()]
        else:
            theta0 = [torch.randint(-64, 64, p.shape, generator=gen0).float() / 16 for p in model.parameters()]
        out[f"theta0_{data}"] = theta0
        combos = [(m, o, r) for m in ("shared", "disjoint") for o in ("mean", "sum") for r in ("gather", "allreduce")]
        for n, (mode, op, red) in enumerate(combos):
            set_params(model, theta0)
            mask = shared if mode == "shared" else own[RANK]
            avg = SparseAverager(model, mask, op=op, mode=mode, reduction=red)
            gen = torch.Generator().manual_seed(100 * n + RANK)
            with torch.no_grad():  # "local training": every entry moves, masked or not
                for p in model.parameters():
                    if data == "random":
                        p.add_(0.1 * torch.randn(p.shape, generator=gen))
                    else:
                        p.add_(torch.randint(-8, 8, p.shape, generator=gen).float() / 32)
            pre = params_of(model)
            sent = avg.exchange()
            results[(data, mode, op, red)] = {
                "pre": pre,
                "post": params_of(model),
                "sent": sent,
                "stats": avg.stats(),
                "union_k": avg.k_exchanged,
            }
        for red in ("gather", "allreduce"):
            set_params(model, theta0)
            avg = SparseAverager(model, None, reduction=red, dense_chunk_numel=37)  # 6 chunks
            gen = torch.Generator().manual_seed(999 + RANK)
            with torch.no_grad():
                for p in model.parameters():
                    if data == "random":
                        p.add_(0.1 * torch.randn(p.shape, generator=gen))
                    else:
                        p.add_(torch.randint(-8, 8, p.shape, generator=gen).float() / 32)
            pre = params_of(model)
            sent = avg.dense_exchange()
            results[(data, "dense", "mean", red)] = {"pre": pre, "post": params_of(model), "sent": sent, "stats": avg.stats()}
    # bf16 parameters: values travel as bf16 (default) or fp32, are summed in fp32, rounded back
    for cdt in (None, torch.float32):
        model16 = make_model(dtype=torch.bfloat16)
        avg = SparseAverager(model16, shared, comm_dtype=cdt)
        gen = torch.Generator().manual_seed(55 + RANK)
        with torch.no_grad():
            for p in model16.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=gen).to(torch.bfloat16))
        pre = params_of(model16)
        sent = avg.exchange()
        results[("bf16", "shared", "mean", str(cdt))] = {"pre": pre, "post": params_of(model16), "sent": sent}
    out["exact"] = results
    # channels_last convolution weights: flat indices are row-major, memory order differs
    torch.manual_seed(1)
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 2, 1)).to(memory_format=torch.channels_last)
    assert not conv[0].weight.is_contiguous()
    cshared = make_mask(conv, 0.3, seed=2)
    cown = [make_mask(conv, 0.2, seed=30 + r) for r in range(WORLD)]
    cstart = params_of(conv)
    conv_res = {"shared_mask": cshared.to_boolean(), "own_masks": [m.to_boolean() for m in cown], "start": cstart}
    for mode, op in (("shared", "mean"), ("disjoint", "sum"), ("disjoint", "mean")):
        set_params(conv, cstart)
        avg = SparseAverager(conv, cshared if mode == "shared" else cown[RANK], mode=mode, op=op)
        gen = torch.Generator().manual_seed(77 + RANK)
        with torch.no_grad():
            for p in conv.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
        pre = params_of(conv)
        avg.exchange()
        conv_res[(mode, op)] = {"pre": pre, "post": params_of(conv)}
    set_params(conv, cstart)
    conv_res["still_channels_last"] = not conv[0].weight.is_contiguous()
    out["conv"] = conv_res


def scenario_train(out: dict) -> None:
    """Dense warm-up, rank 0's mask broadcast, H local MaskedAdamW steps per exchange, a
    checkpoint and resume, MaskedSGD with op='sum', mask recomputation, bf16 + master weights."""
    rec = {}
    model = make_model(seed=RANK)  # different initialisations on purpose: sync_parameters fixes it
    rec["init_rank0"] = params_of(make_model(seed=0))
    avg = SparseAverager(model, None, timeout=30)
    avg.sync_parameters(src=0)
    rec["after_sync"] = params_of(model)
    warm = torch.optim.SGD(model.parameters(), lr=0.1)
    local_steps(model, warm, RANK, 0, 2)
    rec["warm_bytes"] = avg.dense_exchange()
    avg.assert_in_sync()
    rec["after_warmup"] = params_of(model)

    mask = make_mask(model, 0.1, seed=5) if RANK == 0 else None
    mask = avg.set_mask(mask, broadcast_from=0)
    rec["mask_digest"] = mask.digest
    rec["mask"] = mask.to_boolean()
    rec["theta_start"] = params_of(model)
    opt = fishkern.MaskedAdamW(model.named_parameters(), mask, lr=1e-2)
    H = 3
    snapshots = []
    for e in range(4):
        local_steps(model, opt, RANK, 10 + H * e, H)
        rec.setdefault("local", []).append(params_of(model))
        rec.setdefault("sent", []).append(avg.exchange())
        avg.assert_in_sync()
        rec.setdefault("after_exchange", []).append(params_of(model))
        if e == 1:
            snapshots = [copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), copy.deepcopy(avg.state_dict())]
    rec["final"] = params_of(model)
    rec["stats"] = avg.stats()
    rec["state_dict"] = avg.state_dict()

    # resume from the checkpoint taken after exchange #2 into fresh objects: bit-identical run
    model.load_state_dict(snapshots[0])
    opt2 = fishkern.MaskedAdamW(model.named_parameters(), mask, lr=1e-2)
    opt2.load_state_dict(snapshots[1])
    avg2 = SparseAverager(model, mask, timeout=30)
    avg2.load_state_dict(snapshots[2])
    rec["resumed_counters"] = (avg2.exchanges, avg2.dense_exchanges, avg2.sparse_bytes_sent, avg2.dense_bytes_sent)
    for e in (2, 3):
        local_steps(model, opt2, RANK, 10 + H * e, H)
        avg2.exchange()
    rec["resumed_final"] = params_of(model)
    rec["resumed_exchanges"] = avg2.exchanges

    # MaskedSGD (Nesterov momentum) with summed updates, then a recomputed mask from rank 0
    avg3 = SparseAverager(model, mask, op="sum")
    sgd = fishkern.MaskedSGD(model.named_parameters(), mask, lr=0.05, momentum=0.9, nesterov=True)
    rec["sgd_start"] = params_of(model)
    for e in range(2):
        local_steps(model, sgd, RANK, 50 + 2 * e, 2)
        if e == 1:  # op='sum' needs the values at the last synchronisation: they are in the state dict
            local, sd = params_of(model), avg3.state_dict()
            avg3.exchange()
            direct = params_of(model)
            set_params(model, local)
            fresh = SparseAverager(model, mask, op="sum")  # its own base would be today's local values
            fresh.load_state_dict(sd)
            fresh.exchange()
            rec["sum_resume_equal"] = all(torch.equal(x, y) for x, y in zip(direct, params_of(model)))
            set_params(model, local)
            SparseAverager(model, mask, op="sum").exchange()  # without the saved base: a different result
            rec["sum_without_base_differs"] = not all(torch.equal(x, y) for x, y in zip(direct, params_of(model)))
            set_params(model, direct)
            rec["sum_base_saved"] = sd["base"] is not None and sd["base"].numel() == mask.k
        else:
            avg3.exchange()
        avg3.assert_in_sync()
        rec.setdefault("sgd_after_exchange", []).append(params_of(model))
    new_mask = make_mask(model, 0.1, seed=6) if RANK == 0 else None
    new_mask = avg3.set_mask(new_mask)  # broadcast_from=0 by default in shared mode
    rec["new_mask_digest"] = new_mask.digest
    rec["new_mask"] = new_mask.to_boolean()
    rec["recomputed_start"] = params_of(model)
    sgd = fishkern.MaskedSGD(model.named_parameters(), new_mask, lr=0.05, momentum=0.9)
    local_steps(model, sgd, RANK, 60, 2)
    avg3.exchange()
    avg3.assert_in_sync()
    rec["recomputed_after"] = params_of(model)

    # disjoint per-worker masks, trained with MaskedAdamW, merged with op="sum"
    dmodel = make_model(seed=3)
    own = make_mask(dmodel, 0.1, seed=20 + RANK)
    davg = SparseAverager(dmodel, own, mode="disjoint", op="sum")
    rec["disjoint_masks"] = [m.to_boolean() for m in davg.masks]
    rec["disjoint_start"] = params_of(dmodel)
    dopt = fishkern.MaskedAdamW(dmodel.named_parameters(), own, lr=1e-2)
    for e in range(2):
        local_steps(dmodel, dopt, RANK, 70 + 2 * e, 2)
        rec.setdefault("disjoint_local", []).append(params_of(dmodel))
        davg.exchange()
        davg.assert_in_sync()
        rec.setdefault("disjoint_after", []).append(params_of(dmodel))

    # bf16 parameters with fp32 master weights: the masters follow the exchange
    bmodel = make_model(seed=4, dtype=torch.bfloat16)
    bmask = make_mask(bmodel, 0.2, seed=8)
    bopt = fishkern.MaskedAdamW(bmodel.named_parameters(), bmask, lr=1e-3, master_weights=True)
    bavg = SparseAverager(bmodel, bmask, comm_dtype=torch.float32, optimizers=[bopt])
    local_steps(bmodel, bopt, RANK, 80, 2)
    masters_before = bopt._runtime[0].buffers["master"].clone()
    bavg.exchange()
    bavg.assert_in_sync()
    rec["bf16_masters_before"] = masters_before
    rec["bf16_masters_after"] = bopt._runtime[0].buffers["master"].clone()
    rec["bf16_params_after"] = params_of(bmodel)
    rec["bf16_mask"] = bmask.to_boolean()
    rec["bf16_sent"] = bavg.last_exchange_bytes
    local_steps(bmodel, bopt, RANK, 90, 1)
    rec["bf16_after_next_step"] = params_of(bmodel)
    out["train"] = rec


def scenario_errors(out: dict) -> None:
    """Mask mismatch, settings mismatch, a mask that does not fit one rank's model, broadcast and
    gather of masks. Every error is raised on every rank (the group stays usable)."""
    rec = {}
    model = make_model()
    good = make_mask(model, 0.25, seed=0)
    # rank 1 holds another mask
    mask = make_mask(model, 0.25, seed=1) if RANK == 1 else good
    try:
        SparseAverager(model, mask)
        rec["mismatch"] = None
    except MaskMismatchError as e:
        rec["mismatch"] = (type(e).__name__, str(e), {k: v for k, v in e.groups.items()})
    # the last rank uses op="sum"
    try:
        SparseAverager(model, good, op="sum" if RANK == WORLD - 1 else "mean")
        rec["config"] = None
    except ConfigMismatchError as e:
        rec["config"] = (type(e).__name__, str(e))
    # the last rank passes a mask made for another model
    other = make_mask(torch.nn.Linear(3, 2), 0.5, seed=0)
    try:
        SparseAverager(model, other if RANK == WORLD - 1 else good)
        rec["setup"] = None
    except DistributedError as e:
        rec["setup"] = (type(e).__name__, str(e))
    except ValueError as e:
        rec["setup"] = (type(e).__name__, str(e))
    # disjoint mode: rank 1 has no mask
    try:
        SparseAverager(model, None if RANK == 1 else make_mask(model, 0.2, seed=10 + RANK), mode="disjoint")
        rec["disjoint_missing"] = None
    except DistributedError as e:
        rec["disjoint_missing"] = str(e)
    # the group still works: rank 0's mask reaches everybody
    got = broadcast_mask(good if RANK == 0 else None, src=0)
    rec["broadcast_digest"] = got.digest
    rec["good_digest"] = good.digest
    avg = SparseAverager(model, None)
    m = avg.set_mask(make_mask(model, 0.3, seed=42) if RANK == 0 else None, broadcast_from=0)
    rec["set_mask_digest"] = m.digest
    rec["set_mask_bytes"] = avg.mask_bytes_sent
    try:
        avg.set_mask(None, broadcast_from=WORLD - 1)  # the source has no mask: everybody is told
        rec["no_source"] = None
    except DistributedError as e:
        rec["no_source"] = str(e)
    mine = make_mask(model, 0.2, seed=10 + RANK)
    rec["gathered_digests"] = [x.digest for x in all_gather_masks(mine)]
    rec["own_digest"] = mine.digest
    avg.verify()
    out["errors"] = rec


def scenario_timeout(out: dict) -> None:
    """Rank 1 never joins exchange #1 (it hangs until the test kills it): rank 0 must get a
    CollectiveTimeoutError after ~3 s, and then be able to exit normally."""
    model = make_model()
    avg = SparseAverager(model, make_mask(model, 0.25, seed=0), timeout=3)
    if RANK == 1:
        time.sleep(120)
        os._exit(3)
    t = time.monotonic()
    try:
        avg.exchange()
        out["timeout"] = {"error": None}
    except CollectiveTimeoutError as e:
        out["timeout"] = {
            "error": type(e).__name__,
            "message": str(e),
            "operation": e.operation,
            "timeout_s": e.timeout_s,
            "is_timeout_error": isinstance(e, TimeoutError),
            "elapsed": time.monotonic() - t,
        }


def scenario_die(out: dict) -> None:
    """Rank 1 exits without closing anything: rank 0's exchange fails with a CollectiveError."""
    model = make_model()
    avg = SparseAverager(model, make_mask(model, 0.25, seed=0), timeout=20)
    if RANK == 1:
        os._exit(0)
    time.sleep(0.5)
    t = time.monotonic()
    try:
        avg.exchange()
        out["die"] = {"error": None}
    except DistributedError as e:
        out["die"] = {
            "error": type(e).__name__,
            "message": str(e),
            "operation": getattr(e, "operation", None),
            "elapsed": time.monotonic() - t,
        }


SCENARIOS = {
    "exact": scenario_exact,
    "train": scenario_train,
    "errors": scenario_errors,
    "timeout": scenario_timeout,
    "die": scenario_die,
}


def main() -> None:
    names, out_dir = sys.argv[1].split(","), sys.argv[2]
    init_from_env(backend="gloo", timeout=30, init_method=os.environ["FISHKERN_TEST_INIT"])
    out: dict = {"rank": RANK, "world_size": WORLD, "times": {}}
    for name in names:
        t = time.monotonic()
        SCENARIOS[name](out)
        out["times"][name] = time.monotonic() - t
    path = os.path.join(out_dir, f"rank{RANK}.pt")
    torch.save(out, path + ".tmp")
    os.replace(path + ".tmp", path)
    if not any(n in ("timeout", "die") for n in names):
        shutdown()
        return
    # the group is broken on purpose: the results are written; leave without the interpreter's
    # teardown, where gloo's destructors abort ("terminate called without an active exception")
    # now and then while a dead or hung peer is still registered
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    try:
        main()
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
