"""One rank of tests/distributed/test_distributed_hardening.py (issue 10, items 7 and 8).

    RANK=r WORLD_SIZE=M FISHKERN_TEST_INIT=file:///tmp/.../store python _dist_hardening_worker.py SCENARIO OUT_DIR

Runs one scenario and saves what it recorded to OUT_DIR/rank{r}.pt; the test process checks it.
Every error a case raises is recorded as (class name, message, .operations), never re-raised, so
one case's outcome cannot hide the next one's. Uses only names that exist in older fishkern
versions at import time (new error classes are compared by name), so that the tests can be run
against an older checkout and fail there instead of erroring on an import.
"""
from __future__ import annotations

import os
import sys
import time
import traceback

import torch

torch.set_num_threads(1)

import torch.distributed as dist  # noqa: E402

from fishkern import FishMask  # noqa: E402
from fishkern.distributed import SparseAverager, broadcast_mask  # noqa: E402

RANK = int(os.environ["RANK"])
WORLD = int(os.environ["WORLD_SIZE"])
T = 4  # seconds: the timeout of every averager's collectives here (bounds a hang of old code)


def conv_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 2, 1))


def make_mask(model: torch.nn.Module, density: float, seed: int) -> FishMask:
    gen = torch.Generator().manual_seed(seed)
    return FishMask.from_boolean({n: torch.rand(p.shape, generator=gen) < density for n, p in model.named_parameters()})


def perturb(model: torch.nn.Module, seed: int, buffers: bool = False) -> None:
    """'Local training': every entry moves, masked or not, differently on every rank."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen).to(p.dtype))
        if buffers:
            for b in model.buffers():
                if b.is_floating_point():
                    b.add_(torch.rand(b.shape, generator=gen))


def values(model: torch.nn.Module, buffers: bool = False) -> list[torch.Tensor]:
    """Row-major copies (whatever the memory layout)."""
    out = [p.detach().contiguous().clone() for p in model.parameters()]
    if buffers:
        out += [b.detach().contiguous().clone() for b in model.buffers() if b.is_floating_point()]
    return out


def attempt(fn) -> dict:
    """Run one call; record its error instead of raising it."""
    t = time.monotonic()
    try:
        fn()
        return {"error": None, "elapsed": time.monotonic() - t}
    except Exception as e:  # recorded and checked by the test
        return {
            "error": type(e).__name__,
            "message": str(e),
            "operations": getattr(e, "operations", None),
            "is_distributed": type(e).__module__.startswith("fishkern.distributed"),
            "elapsed": time.monotonic() - t,
        }


def channels_last(model: torch.nn.Module) -> None:
    model.to(memory_format=torch.channels_last)
    assert not model[0].weight.is_contiguous()


# ---------------------------------------------------------------------------- item 7: layouts
def scenario_layout(out: dict) -> None:
    """Exchanges after model.to(memory_format=torch.channels_last) — on every rank or on rank 0
    only — against a twin model that stays contiguous, and dense operations with mixed layouts."""
    start = values(conv_model())
    shared = make_mask(conv_model(), 0.3, seed=1)
    own = [make_mask(conv_model(), 0.25, seed=20 + r) for r in range(WORLD)]
    out["start"] = start
    out["shared_mask"] = list(shared.to_boolean().values())
    out["own_masks"] = [list(m.to_boolean().values()) for m in own]
    res = out["sparse"] = {}  # filled as it goes: what was recorded is saved even if a later step fails
    for mode, op in (("shared", "mean"), ("shared", "sum"), ("disjoint", "sum"), ("disjoint", "mean")):
        for where in ("all", "rank0"):
            mask = shared if mode == "shared" else own[RANK]
            model, twin = conv_model(), conv_model()
            avg = SparseAverager(model, mask, mode=mode, op=op, timeout=T)
            tavg = SparseAverager(twin, mask, mode=mode, op=op, timeout=T)
            seed = 100 * RANK + len(res)
            perturb(model, seed)
            perturb(twin, seed)
            if where == "all" or RANK == 0:
                channels_last(model)
            rec = {"pre": values(model)}
            avg.exchange()
            tavg.exchange()
            rec["post"], rec["twin_post"] = values(model), values(twin)
            rec["still_channels_last"] = not model[0].weight.is_contiguous()
            # and back to contiguous for a second exchange: the offsets follow again
            perturb(model, seed + 50)
            perturb(twin, seed + 50)
            model.to(memory_format=torch.contiguous_format)
            avg.exchange()
            tavg.exchange()
            rec["post2"], rec["twin_post2"] = values(model), values(twin)
            res[(mode, op, where)] = rec

    # dense_exchange (parameters and BatchNorm buffers, chunks that split the conv weight) with
    # rank 0 channels_last and the others contiguous
    model, twin = conv_model(), conv_model()
    avg = SparseAverager(model, None, timeout=T, dense_chunk_numel=50)
    tavg = SparseAverager(twin, None, timeout=T, dense_chunk_numel=50)
    perturb(model, 7 + RANK, buffers=True)
    perturb(twin, 7 + RANK, buffers=True)
    if RANK == 0:
        channels_last(model)
    dense = {"pre": values(model, True)}
    avg.dense_exchange(buffers=True)
    tavg.dense_exchange(buffers=True)
    dense["post"], dense["twin_post"] = values(model, True), values(twin, True)
    dense["still_channels_last"] = RANK != 0 or not model[0].weight.is_contiguous()
    out["dense"] = dense

    # sync_parameters from rank 0 (channels_last) to ranks that are contiguous, and the reverse
    sync = out["sync"] = {}
    for src_layout in ("channels_last", "contiguous"):
        model = conv_model(seed=RANK)  # different initialisations: the sync fixes that
        avg = SparseAverager(model, None, timeout=T)
        perturb(model, 30 + RANK, buffers=True)
        if (RANK == 0) == (src_layout == "channels_last"):
            channels_last(model)
        rec = {"pre": values(model, True)}
        avg.sync_parameters(src=0)
        rec["post"] = values(model, True)
        rec["in_sync"] = attempt(lambda: avg.assert_in_sync(buffers=True))
        sync[src_layout] = rec


# ---------------------------------------------------------------------------- item 7: refusals
def scenario_changed(out: dict) -> None:
    """Changes other than the layout after construction: refused on every rank, nothing written."""
    res = out["changed"] = {}

    def case(name, change, call, *, who=None, mask=True):
        model = conv_model()
        m = make_mask(model, 0.3, seed=1)
        avg = SparseAverager(model, m if mask else None, timeout=T)
        perturb(model, 200 + RANK)
        if who is None or RANK == who:
            model = change(model) or model
        before = [p.detach().clone() for p in model.parameters()]
        rec = attempt(lambda: call(avg))
        after = [p.detach().clone() for p in model.parameters()]
        rec["unchanged"] = all(torch.equal(a, b) for a, b in zip(before, after))
        res[name] = rec

    def to_double(model):
        model.to(torch.float64)

    def weight_data(model):
        model[0].weight.data = torch.zeros(4, 3, 3, 2)

    def assign(model):
        model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)

    def new_submodule(model):
        model[2] = torch.nn.Conv2d(4, 2, 1)

    exchange = lambda a: a.exchange()  # noqa: E731
    case("dtype_all_ranks", to_double, exchange)
    case("dtype_rank1", lambda m: m.to(torch.bfloat16), exchange, who=1)
    case("data_shape_rank1", weight_data, exchange, who=1)
    case("assign_all_ranks", assign, exchange)
    case("submodule_rank0", new_submodule, lambda a: a.dense_exchange(), who=0, mask=False)
    # every other entry point checks the model too (rank 1 converted it to float64)
    for name, call in (
        ("dense_exchange", lambda a: a.dense_exchange()),
        ("sync_parameters", lambda a: a.sync_parameters(0)),
        ("assert_in_sync", lambda a: a.assert_in_sync()),
        ("verify", lambda a: a.verify()),
        ("set_mask", lambda a: a.set_mask(make_mask(conv_model(), 0.2, seed=3))),
    ):
        case(f"{name}_dtype_rank1", to_double, call, who=1)

    # the group and a fresh averager still work afterwards
    model = conv_model()
    m = make_mask(model, 0.3, seed=1)
    avg = SparseAverager(model, m, timeout=T)
    perturb(model, 300 + RANK)
    out["after_pre"] = values(model)
    out["after"] = attempt(avg.exchange)
    out["after_post"] = values(model)
    out["mask"] = list(m.to_boolean().values())


# ---------------------------------------------------------------------------- item 8: mismatches
def scenario_mismatch(out: dict) -> None:
    """Ranks calling different collectives (rank 1 the odd one out unless noted): every rank
    raises, no rank dies, nothing is written; then the same group still exchanges correctly."""
    res = out["mismatch"] = {}
    odd = RANK == 1

    def case(name, calls, *, op="mean", mask=True, prepare=None):
        model = conv_model()
        m = make_mask(model, 0.3, seed=1)
        avg = SparseAverager(model, m if mask else None, op=op, timeout=T)
        ctx = {"model": model, "avg": avg, "mask": m}
        if prepare is not None:
            prepare(ctx)
        perturb(model, 400 + 10 * RANK + len(res), buffers=True)
        before = values(model, True)
        rec = attempt(lambda: calls(ctx))
        rec["unchanged"] = all(torch.equal(a, b) for a, b in zip(before, values(model, True)))
        res[name] = rec

    X = lambda c: c["avg"].exchange()  # noqa: E731
    D = lambda c: c["avg"].dense_exchange()  # noqa: E731
    case("exchange_vs_dense_exchange", lambda c: D(c) if odd else X(c))
    case("exchange_vs_sync_parameters", lambda c: c["avg"].sync_parameters(0) if odd else X(c))
    case("exchange_vs_assert_in_sync", lambda c: c["avg"].assert_in_sync() if odd else X(c))
    case("dense_exchange_vs_set_mask", lambda c: c["avg"].set_mask(c["mask"]) if odd else D(c))
    case("verify_vs_exchange", lambda c: X(c) if odd else c["avg"].verify())
    case(
        "exchange_vs_construction",
        lambda c: SparseAverager(c["model"], c["mask"], timeout=T) if odd else X(c),
    )
    case(
        "set_mask_vs_broadcast_mask",
        lambda c: broadcast_mask(c["mask"], 0, timeout=T) if odd else c["avg"].set_mask(c["mask"]),
    )

    def twins(c):
        c["twin"] = conv_model()
        c["tavg"] = SparseAverager(c["twin"], c["mask"], timeout=T)  # same model, same mask: averager #2

    def crossed(c):  # rank 1 exchanges the twin's averager: the two models' values must not mix
        if odd:
            perturb(c["twin"], 999)
            c["tavg"].exchange()
        else:
            X(c)

    case("crossed_averagers", crossed, prepare=twins)

    def stale_counters(c):  # op='sum': rank 1 resumed from an older state (another base)
        c["old"] = c["avg"].state_dict()
        perturb(c["model"], 77 + RANK)
        c["avg"].exchange()
        if odd:
            c["avg"].load_state_dict(c["old"])

    case("exchange_counters_differ", X, op="sum", prepare=stale_counters)
    case("sync_parameters_src_differs", lambda c: c["avg"].sync_parameters(2 if odd else 0))
    case("dense_exchange_buffers_differ", lambda c: c["avg"].dense_exchange(buffers=not odd))

    def chunk(c):
        if odd:
            c["avg"].dense_chunk_numel = 7
        D(c)

    case("dense_chunk_numel_differs", chunk)
    case("set_mask_broadcast_from_differs", lambda c: c["avg"].set_mask(c["mask"], broadcast_from=None if odd else 0))
    # a bad argument on one rank only: it raises its own error, the others name it
    case("sync_parameters_bad_src_rank1", lambda c: c["avg"].sync_parameters(5 if odd else 0))
    case("set_mask_not_a_mask_rank1", lambda c: c["avg"].set_mask("mask" if odd else c["mask"], broadcast_from=None))
    case(
        "construction_bad_op_rank1",
        lambda c: SparseAverager(c["model"], c["mask"], op="median" if odd else "mean", timeout=T),
    )

    # the same group still works, and an exchange costs exactly one extra (header) collective
    from fishkern.distributed import _comm

    model = conv_model()
    m = make_mask(model, 0.3, seed=1)
    avg = SparseAverager(model, m, timeout=T)
    perturb(model, 500 + RANK)
    out["after_pre"] = values(model)
    calls, run = [], _comm.Comm.run

    def counting(self, operation, issue):
        calls.append(operation)
        return run(self, operation, issue)

    _comm.Comm.run = counting
    try:
        out["after"] = attempt(avg.exchange)
    finally:
        _comm.Comm.run = run
    out["after_collectives"] = calls
    out["after_post"] = values(model)
    out["mask"] = list(m.to_boolean().values())


SCENARIOS = {"layout": scenario_layout, "changed": scenario_changed, "mismatch": scenario_mismatch}


def main() -> None:
    name, out_dir = sys.argv[1], sys.argv[2]
    import datetime

    dist.init_process_group(
        "gloo",
        init_method=os.environ["FISHKERN_TEST_INIT"],
        rank=RANK,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=20),
    )
    out: dict = {"rank": RANK, "world_size": WORLD}
    t = time.monotonic()
    try:
        SCENARIOS[name](out)
    finally:  # what was recorded before an error still reaches the test (a signal loses it all)
        out["seconds"] = time.monotonic() - t
        path = os.path.join(out_dir, f"rank{RANK}.pt")
        torch.save(out, path + ".tmp")
        os.replace(path + ".tmp", path)
    dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
