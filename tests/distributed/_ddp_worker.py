"""One rank of the synchronous data-parallel tests (tests/distributed/test_ddp.py starts M of these).

    RANK=r WORLD_SIZE=M FISHKERN_TEST_INIT=file:///tmp/.../store python _ddp_worker.py SCENARIOS OUT_DIR

Every scenario trains the same small model (a channels_last Conv2d, Linears, a LayerNorm) from the
same initial weights for a few steps on a global batch split evenly over the ranks, and records
the final parameters, the gradients the optimizer saw and the bytes handed to
``torch.distributed.all_reduce``. Rank 0 also runs the single-process reference on the whole
global batch. The test process compares them.
"""
from __future__ import annotations

import datetime
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist

torch.set_num_threads(1)

import fishkern  # noqa: E402
from fishkern import FishMask, MaskedAdamW, MaskedSGD  # noqa: E402
from fishkern.distributed import masked_ddp, register_masked_comm_hook  # noqa: E402

RANK = int(os.environ["RANK"])
WORLD = int(os.environ["WORLD_SIZE"])
GLOBAL_BATCH = 12  # divisible by 2 and 3 ranks
STEPS = 4


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.norm = torch.nn.LayerNorm(4 * 5 * 5)
        self.fc = torch.nn.Linear(4 * 5 * 5, 9)
        self.frozen = torch.nn.Linear(9, 9)  # gets an empty mask: must never enter a DDP bucket
        self.head = torch.nn.Linear(9, 3)

    checkpointed = False  # reentrant activation checkpointing of the fc layer: a nested backward

    def forward(self, x):
        h = self.norm(torch.relu(self.conv(x)).flatten(1))
        if self.checkpointed:
            h = torch.utils.checkpoint.checkpoint(lambda t: torch.tanh(self.fc(t)), h, use_reentrant=True)
        else:
            h = torch.tanh(self.fc(h))
        return self.head(torch.tanh(self.frozen(h)))


def make_model() -> Net:
    torch.manual_seed(0)
    return Net().to(memory_format=torch.channels_last)


def make_mask(model: Net, seed: int = 0) -> FishMask:
    g = torch.Generator().manual_seed(seed)
    keep = {}
    for n, p in model.named_parameters():
        keep[n] = torch.rand(p.shape, generator=g) < 0.3
        if n.startswith("frozen"):
            keep[n] = torch.zeros(p.shape, dtype=torch.bool)
    return FishMask.from_boolean(keep)


def batch(step: int, micro: int = 0):
    g = torch.Generator().manual_seed(1000 + 10 * step + micro)
    return torch.randn(GLOBAL_BATCH, 3, 7, 7, generator=g), torch.randint(0, 3, (GLOBAL_BATCH,), generator=g)


def local(t: torch.Tensor, world: int, rank: int) -> torch.Tensor:
    n = t.shape[0] // world
    return t[rank * n : (rank + 1) * n]


class ByteCounter:
    """Counts the bytes every torch.distributed.all_reduce call is handed, while armed."""

    def __init__(self):
        self.bytes, self.calls, self.armed = 0, 0, False
        self._orig = dist.all_reduce

        def counting(tensor, *a, **k):
            if self.armed:
                self.bytes += tensor.numel() * tensor.element_size()
                self.calls += 1
            return self._orig(tensor, *a, **k)

        dist.all_reduce = counting


COUNTER: ByteCounter | None = None


def make_opt(kind: str, model, mask, free: bool):
    if kind == "sgd":
        return MaskedSGD(model.named_parameters(), mask, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3,
                         free_dense_grads=free)
    return MaskedAdamW(model.named_parameters(), mask, lr=1e-2, weight_decay=0.01, free_dense_grads=free)


def _ddp_kwargs(cfg: dict) -> dict:
    kw = {"bucket_cap_mb": cfg.get("bucket_mb", 25), "static_graph": cfg.get("static", False),
          "find_unused_parameters": cfg.get("unused", False)}
    if "bucket_view" in cfg:  # else each wrapper's default: False for DDP, True for masked_ddp
        kw["gradient_as_bucket_view"] = cfg["bucket_view"]
    return kw


def train(cfg: dict, world: int, rank: int) -> dict:
    """One configuration: returns final parameters, the optimizer's gathered gradients per step and
    the bytes all-reduced during backward."""
    model = make_model()
    model.checkpointed = cfg.get("ckpt", False)
    mask = make_mask(model)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    free = cfg.get("free", False)
    opt = make_opt(cfg.get("opt", "adamw"), model, mask, free) if cfg.get("opt_first", True) else None
    net = model
    state = None
    if world > 1 and cfg.get("warmup_backward"):  # a backward before DDP exists (then discarded)
        x, y = batch(99)
        torch.nn.functional.cross_entropy(model(local(x, world, rank)), local(y, world, rank)).backward()
        opt.zero_grad()
    if world > 1:
        mode = cfg.get("ddp", "plain")
        if mode == "plain":
            net = torch.nn.parallel.DistributedDataParallel(model, **_ddp_kwargs(cfg))
        elif mode == "hook":
            net = masked_ddp(model, mask, dtype=cfg.get("dtype"), **_ddp_kwargs(cfg))
            state = net._fishkern_comm_state
        elif mode == "register":  # a DDP someone else built, hook added afterwards
            for n, p in model.named_parameters():
                p.requires_grad_(not n.startswith("frozen"))
            net = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=cfg.get("bucket_mb", 25))
            state = register_masked_comm_hook(net, mask)
    if opt is None:
        opt = make_opt(cfg.get("opt", "adamw"), model, mask, free)
    micro = cfg.get("micro", 1)
    grads, sent = [], []
    for step in range(STEPS):
        if world > 1 and cfg.get("rewrap") and step == STEPS // 2:  # a new DDP module mid-training
            net = torch.nn.parallel.DistributedDataParallel(model, static_graph=True)
        COUNTER.bytes = 0
        for m in range(micro):
            x, y = batch(step, m)
            if world > 1:
                x, y = local(x, world, rank), local(y, world, rank)
            sync = m == micro - 1
            ctx = net.no_sync() if (world > 1 and not sync) else _null()
            with ctx:
                out = net(x)
                loss = torch.nn.functional.cross_entropy(out, y) / micro
                COUNTER.armed = True
                loss.backward()
                COUNTER.armed = False
        rt = opt._runtime[0]
        # the gradients the optimizer will use (gathered by the hooks, or read from .grad at step)
        g = []
        lay = opt._layouts[0]
        for i in lay.trainable:
            if rt.grad_ready[i]:
                g.append(rt.grad[lay.slice(i)].clone())
            else:
                gi = opt._grad_of(lay, i)
                g.append(fishkern.optim._layout.flat_memory_view(gi).index_select(0, lay.mem_indices[i]).clone())
        grads.append(torch.cat(g))
        sent.append(COUNTER.bytes)
        opt.step()
        dense_grads_left = [n for n, p in model.named_parameters() if p.grad is not None]  # after step
        opt.zero_grad()
    final = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {
        "final": final,
        "init": init,
        "grads": grads,
        "sent": sent,
        "k": mask.k,
        "k_trainable": sum(mask.k_of(n) for n in mask.shapes if not n.startswith("frozen")),
        "dense_grads_left_after_step": dense_grads_left,
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "hook_stats": state.stats() if state is not None else None,
        "mask": {n: idx.clone() for n, idx in mask.indices.items()},
    }


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


CONFIGS = {
    "plain": {"ddp": "plain"},
    "plain_free": {"ddp": "plain", "free": True},
    "plain_free_view": {"ddp": "plain", "free": True, "bucket_view": True},
    "hook": {"ddp": "hook"},
    "hook_free": {"ddp": "hook", "free": True},
    "hook_free_copies": {"ddp": "hook", "free": True, "bucket_view": False},
    "hook_free_small_buckets": {"ddp": "hook", "free": True, "bucket_mb": 0.001},
    "hook_bf16": {"ddp": "hook", "free": True, "dtype": torch.bfloat16},
    "register": {"ddp": "register", "free": True},
    "accum_plain_free": {"ddp": "plain", "free": True, "micro": 2},
    "accum_hook_free": {"ddp": "hook", "free": True, "micro": 2},
    "accum_plain": {"ddp": "plain", "micro": 2},
    "sgd_hook_free": {"ddp": "hook", "free": True, "opt": "sgd"},
    "sgd_plain": {"ddp": "plain", "opt": "sgd"},
    "opt_after_ddp_free": {"ddp": "hook", "free": True, "opt_first": False},
    # reentrant checkpointing runs nested backward passes; a hook-time gather would end with them
    "ckpt_plain_free": {"ddp": "plain", "free": True, "ckpt": True},
    "ckpt_hook_free": {"ddp": "hook", "free": True, "ckpt": True},
    "static_hook_free": {"ddp": "hook", "free": True, "static": True},
    "unused_hook_free": {"ddp": "hook", "free": True, "unused": True},
    "warmup_then_ddp_free": {"ddp": "plain", "free": True, "warmup_backward": True},
    "rewrap_free": {"ddp": "plain", "free": True, "rewrap": True},
}


def scenario_equivalence(out: dict) -> None:
    runs = {}
    for name, cfg in CONFIGS.items():
        runs[name] = train(cfg, WORLD, RANK)
        dist.barrier()
    out["runs"] = runs
    if RANK == 0:  # the single-process references: the same global batch in one process
        ref = {}
        for name, cfg in CONFIGS.items():
            key = (cfg.get("opt", "adamw"), cfg.get("micro", 1))
            if key not in ref:
                ref[key] = train({"opt": key[0], "micro": key[1]}, 1, 0)
        out["reference"] = {f"{k[0]}-{k[1]}": v for k, v in ref.items()}


def scenario_mismatch(out: dict) -> None:
    """Rank 1 holds another mask: both ranks must refuse before any training."""
    model = make_model()
    mask = make_mask(model, seed=RANK)
    try:
        masked_ddp(model, mask)
        out["mismatch"] = None
    except Exception as e:  # noqa: BLE001 - recorded and checked by the test
        out["mismatch"] = (type(e).__name__, str(e))


def scenario_die(out: dict) -> None:
    """Rank 1 exits before its backward; rank 0's backward must fail with a clear error in time."""
    model = make_model()
    mask = make_mask(model)
    opt = make_opt("adamw", model, mask, True)
    net = masked_ddp(model, mask)
    x, y = batch(0)
    x, y = local(x, WORLD, RANK), local(y, WORLD, RANK)
    if RANK == 1:
        sys.stdout.flush()
        os._exit(0)
    t0 = time.monotonic()
    try:
        torch.nn.functional.cross_entropy(net(x), y).backward()
        out["die"] = None
    except Exception as e:  # noqa: BLE001
        out["die"] = (type(e).__name__, str(e))
    out["die_seconds"] = time.monotonic() - t0
    _save(out)
    sys.stdout.flush()
    os._exit(0)  # the process group is broken on purpose


def scenario_hang(out: dict) -> None:
    """Rank 1 never arrives at the backward (it sleeps): rank 0 must time out with a clear error."""
    model = make_model()
    mask = make_mask(model)
    net = masked_ddp(model, mask)
    x, y = batch(0)
    x, y = local(x, WORLD, RANK), local(y, WORLD, RANK)
    if RANK == 1:
        time.sleep(60)
        os._exit(0)
    t0 = time.monotonic()
    try:
        torch.nn.functional.cross_entropy(net(x), y).backward()
        out["hang"] = None
    except Exception as e:  # noqa: BLE001
        out["hang"] = (type(e).__name__, str(e))
    out["hang_seconds"] = time.monotonic() - t0
    _save(out)
    sys.stdout.flush()
    os._exit(0)


def fsdp_train(cfg: dict, world: int, rank: int) -> dict:
    """FSDP2 (fully_shard) with a masked optimizer over the DTensor shards; world 1 = the reference."""
    torch.manual_seed(0)
    model = Net()
    mask = make_mask(model)
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        for m in (model.conv, model.fc, model.frozen, model.head):
            fully_shard(m)
        fully_shard(model)
    opt = make_opt(cfg.get("opt", "adamw"), model, mask, cfg.get("free", False))
    norms = []
    for step in range(STEPS):
        x, y = batch(step)
        if world > 1:
            x, y = local(x, world, rank), local(y, world, rank)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        dense_left = [n for n, p in model.named_parameters() if p.grad is not None]
        if cfg.get("clip"):
            norms.append(float(opt.clip_grad_norm_(cfg["clip"])))
        opt.step()
        opt.zero_grad()
    full = {}
    for n, p in model.named_parameters():
        full[n] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
    return {"final": full, "norms": norms, "k_local": opt.num_masked(), "k": mask.k,
            "state_bytes": opt.state_bytes(), "dense_grads_after_backward": dense_left}


FSDP_CONFIGS = {
    "fsdp": {},
    "fsdp_free": {"free": True},
    "fsdp_clip": {"clip": 0.05},
    "fsdp_sgd": {"opt": "sgd"},
}


def scenario_fsdp(out: dict) -> None:
    out["fsdp"] = {name: fsdp_train(cfg, WORLD, RANK) for name, cfg in FSDP_CONFIGS.items()}
    if RANK == 0:
        out["fsdp_reference"] = {name: fsdp_train(cfg, 1, 0) for name, cfg in FSDP_CONFIGS.items()}


def _outcome(fn) -> tuple:
    t0 = time.monotonic()
    try:
        fn()
        return (None, None, time.monotonic() - t0)
    except Exception as e:  # noqa: BLE001 - recorded and checked by the test
        return (type(e).__name__, str(e), time.monotonic() - t0)


def scenario_one_rank_refuses(out: dict) -> None:
    """A refusal or failure on one rank only must reach the other rank at once (not a timeout)."""
    from fishkern.distributed import fisher_mask_distributed

    def fisher_run(data, n=8):
        model = make_model()

        def loss_fn(out_, b):
            return torch.nn.functional.cross_entropy(out_, b[1], reduction="none")

        fisher_mask_distributed(model, data, 0.2, n, force="head", loss_fn=loss_fn, progress=False)

    x, y = batch(0)
    good = [(local(x, WORLD, RANK), local(y, WORLD, RANK))]
    nan_x = good[0][0].clone()
    nan_x[0, 0, 0, 0] = float("nan")
    out["refuse_few_samples"] = _outcome(lambda: fisher_run(good, n=1))
    out["refuse_empty_data"] = _outcome(lambda: fisher_run(good if RANK == 0 else []))
    out["refuse_nan"] = _outcome(lambda: fisher_run(good if RANK == 0 else [(nan_x, good[0][1])]))
    model = make_model()
    mask = make_mask(model)
    if RANK == 1:  # a mask for another model on one rank
        mask = FishMask.from_boolean({n: torch.ones(p.shape, dtype=torch.bool) for n, p in model.named_parameters()
                                      if n != "head.bias"})
    out["refuse_masked_ddp"] = _outcome(lambda: masked_ddp(model, mask))
    out["refuse_settings"] = _outcome(lambda: masked_ddp(make_model(), make_mask(make_model()),
                                                         dtype=torch.bfloat16 if RANK == 1 else None))
    dist.barrier()


def scenario_ddp_then_free_opt(out: dict) -> None:
    """A DDP built first, then free_dense_grads=True wants to freeze a parameter DDP reduces."""
    model = make_model()
    mask = make_mask(model)
    ddp = torch.nn.parallel.DistributedDataParallel(model)  # noqa: F841 - must stay alive
    try:
        make_opt("adamw", model, mask, True)
        out["ddp_then_free"] = None
    except ValueError as e:
        out["ddp_then_free"] = str(e)


SCENARIOS = {"equivalence": scenario_equivalence, "mismatch": scenario_mismatch, "die": scenario_die, "hang": scenario_hang,
             "fsdp": scenario_fsdp, "ddp_then_free": scenario_ddp_then_free_opt,
             "one_rank_refuses": scenario_one_rank_refuses}
OUT_DIR = ""


def _save(out: dict) -> None:
    path = os.path.join(OUT_DIR, f"rank{RANK}.pt")
    torch.save(out, path + ".tmp")
    os.replace(path + ".tmp", path)


def main() -> None:
    global COUNTER, OUT_DIR
    names, OUT_DIR = sys.argv[1].split(","), sys.argv[2]
    timeout = float(os.environ.get("FISHKERN_TEST_TIMEOUT", "60"))
    dist.init_process_group("gloo", init_method=os.environ["FISHKERN_TEST_INIT"], rank=RANK, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=timeout))
    COUNTER = ByteCounter()
    out: dict = {"rank": RANK, "world_size": WORLD}
    for name in names:
        SCENARIOS[name](out)
    _save(out)
    dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
