"""fishkern.distributed on real gloo process groups: 2 and 3 ranks as separate processes.

Each group of ranks runs tests/distributed/_dist_worker.py (rendezvous through a FileStore in tmp_path, so no
ports are involved), records values before / after exchanges, and the checks here compare them
with a single-process reference that does the same floating-point arithmetic — torch.equal, not
closeness. A group is started once per module (fixtures) and shared by several tests.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _multiproc import ROOT, launch

WORKER = Path(__file__).with_name("_dist_worker.py")

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with gloo is not available in this torch build",
)


def _launch(tmp: Path, world: int, scenarios: str, *, wait_for=None, limit: float = 120.0, ok_codes=(0,)):
    """Start ``world`` ranks; wait for the ranks in ``wait_for`` (default all), kill the others
    (they hang on purpose). Returns (results per rank or None, wall seconds per waited rank)."""
    return launch(WORKER, tmp, world, scenarios, wait_for=wait_for, limit=limit, ok_codes=ok_codes)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    res, _ = _launch(tmp_path_factory.mktemp("dist2"), 2, "exact,train")
    return [res[0], res[1]]


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory):
    res, _ = _launch(tmp_path_factory.mktemp("dist3"), 3, "exact,errors")
    return [res[0], res[1], res[2]]


# ---------------------------------------------------------------------------- the reference
def reference_exchange(pres, base, masks, op):
    """Single-process reference of one exchange: pres[r][j] are rank r's values of parameter j,
    base[j] the values at the last synchronisation, masks[r][j] rank r's boolean mask (all equal
    in shared mode). Sums run over ranks in order, in fp32; the result is rounded to the
    parameters' dtype. Returns the expected values on every rank."""
    world = len(pres)
    expected = [[None] * len(base) for _ in range(world)]
    for j in range(len(base)):
        shape, dtype = pres[0][j].shape, pres[0][j].dtype
        b = base[j].reshape(-1).float()
        ms = [masks[r][j].reshape(-1) for r in range(world)]
        vals = [pres[r][j].reshape(-1).float() for r in range(world)]
        union = torch.zeros_like(ms[0])
        for m in ms:
            union |= m
        if op == "mean":
            acc = None
            for r in range(world):
                c = torch.where(ms[r], vals[r], b)
                acc = c.clone() if acc is None else acc + c
            new = acc / world
        else:
            s = torch.zeros_like(b)
            for r in range(world):
                s = torch.where(ms[r], s + (vals[r] - b), s)
            new = b + s
        for r in range(world):
            expected[r][j] = torch.where(union, new, vals[r]).to(dtype).view(shape)
    return expected


def _bool_list(mask_dict):
    return list(mask_dict.values())  # in model order


def _equal_lists(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _check_exact(ranks, *, exact_allreduce: bool):
    world = len(ranks)
    shared = _bool_list(ranks[0]["shared_mask"])
    own = [_bool_list(m) for m in ranks[0]["own_masks"]]
    n_checked = 0
    for key, rec0 in ranks[0]["exact"].items():
        data, mode, op, red = key
        if data == "bf16":
            continue
        pres = [ranks[r]["exact"][key]["pre"] for r in range(world)]
        posts = [ranks[r]["exact"][key]["post"] for r in range(world)]
        theta0 = ranks[0][f"theta0_{data}"]
        if mode == "dense":
            masks = [[torch.ones_like(x, dtype=torch.bool) for x in theta0]] * world
        elif mode == "shared":
            masks = [shared] * world
        else:
            masks = own
        expected = reference_exchange(pres, theta0, masks, op)
        union = [torch.stack([masks[r][j] for r in range(world)]).any(0) for j in range(len(theta0))]
        for r in range(world):  # the exchanged entries hold the same bits on every rank, whatever the reduction
            for j, u in enumerate(union):
                assert torch.equal(posts[r][j][u], posts[0][j][u]), f"{key}: rank {r} differs from rank 0"
        if red == "gather" or exact_allreduce or data == "dyadic":
            for r in range(world):
                assert _equal_lists(posts[r], expected[r]), f"{key}: rank {r} differs from the reference"
        else:  # gloo's ring sums in its own order: equal up to rounding only
            for r in range(world):
                for x, y in zip(posts[r], expected[r]):
                    torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)
        # bytes: 4 per value in fp32
        k_shared = int(sum(m.sum() for m in shared))
        k_own = [int(sum(m.sum() for m in mr)) for mr in own]
        sent = {r: ranks[r]["exact"][key]["sent"] for r in range(world)}
        if mode == "dense":
            want = 4 * sum(x.numel() for x in theta0)
        elif mode == "shared":
            want = 4 * k_shared
        elif red == "gather":
            want = 4 * max(k_own)
        else:
            want = 4 * rec0["union_k"]
        assert set(sent.values()) == {want}, (key, sent, want)
        n_checked += 1
    return n_checked


# ---------------------------------------------------------------------------- exactness
def test_exchange_matches_single_process_reference_2_ranks(two_ranks):
    # with 2 ranks a + b == b + a, so even gloo's all-reduce is exact
    assert _check_exact(two_ranks, exact_allreduce=True) == 2 * (8 + 2)


def test_exchange_matches_single_process_reference_3_ranks(three_ranks):
    # with 3 ranks only the rank-order gather path is exact on arbitrary values; the all-reduce
    # path is exact on values whose every partial sum is representable (the 'dyadic' data)
    assert _check_exact(three_ranks, exact_allreduce=False) == 2 * (8 + 2)


@pytest.mark.parametrize("world", [2, 3])
def test_bf16_values_sum_in_fp32(world, two_ranks, three_ranks):
    ranks = two_ranks if world == 2 else three_ranks
    shared = _bool_list(ranks[0]["shared_mask"])
    for cdt in ("None", "torch.float32"):
        key = ("bf16", "shared", "mean", cdt)
        pres = [ranks[r]["exact"][key]["pre"] for r in range(world)]
        expected = reference_exchange(pres, pres[0], [shared] * world, "mean")
        for r in range(world):
            assert all(x.dtype == torch.bfloat16 for x in ranks[r]["exact"][key]["post"])
            assert _equal_lists(ranks[r]["exact"][key]["post"], expected[r])
        k = int(sum(m.sum() for m in shared))
        assert ranks[0]["exact"][key]["sent"] == k * (2 if cdt == "None" else 4)


@pytest.mark.parametrize("world", [2, 3])
def test_channels_last_parameters(world, two_ranks, three_ranks):
    ranks = two_ranks if world == 2 else three_ranks
    c0 = ranks[0]["conv"]
    assert c0["still_channels_last"]
    shared = _bool_list(c0["shared_mask"])
    own = [_bool_list(m) for m in c0["own_masks"]]
    for mode, op in (("shared", "mean"), ("disjoint", "sum"), ("disjoint", "mean")):
        pres = [ranks[r]["conv"][(mode, op)]["pre"] for r in range(world)]
        masks = [shared] * world if mode == "shared" else own
        expected = reference_exchange(pres, c0["start"], masks, op)
        for r in range(world):
            assert _equal_lists(ranks[r]["conv"][(mode, op)]["post"], expected[r]), (mode, op, r)


def test_unmasked_entries_never_change(two_ranks, three_ranks):
    for ranks in (two_ranks, three_ranks):
        shared = _bool_list(ranks[0]["shared_mask"])
        own = [_bool_list(m) for m in ranks[0]["own_masks"]]
        union = [torch.stack([own[r][j] for r in range(len(ranks))]).any(0) for j in range(len(shared))]
        for key, _ in ranks[0]["exact"].items():
            data, mode = key[0], key[1]
            if mode == "dense":
                continue
            sel = shared if mode == "shared" or data == "bf16" else union
            for r, rank in enumerate(ranks):
                rec = rank["exact"][key]
                for pre, post, m in zip(rec["pre"], rec["post"], sel):
                    assert torch.equal(pre[~m], post[~m]), (key, r)


def test_stats_report_bytes_against_dense(two_ranks):
    st = two_ranks[0]["train"]["stats"]
    k = int(sum(m.sum() for m in two_ranks[0]["train"]["mask"].values()))
    assert st["bytes_per_exchange"] == 4 * k
    assert st["dense_bytes_per_exchange"] == 4 * 202
    assert st["sparse_bytes_sent"] == 4 * 4 * k  # 4 exchanges
    assert st["dense_bytes_sent"] == 4 * 202  # 1 dense warm-up exchange
    assert st["reduction_vs_dense"] == pytest.approx(202 / k)
    assert two_ranks[0]["train"]["sent"] == [4 * k] * 4
    assert st["mask_bytes_sent"] > 0 and two_ranks[1]["train"]["stats"]["mask_bytes_sent"] == 0  # rank 0 broadcast


# ---------------------------------------------------------------------------- training
def test_training_with_masked_adamw_stays_in_sync(two_ranks):
    a, b = two_ranks[0]["train"], two_ranks[1]["train"]
    assert _equal_lists(a["after_sync"], a["init_rank0"]) and _equal_lists(b["after_sync"], a["init_rank0"])
    assert _equal_lists(a["after_warmup"], b["after_warmup"])
    assert a["mask_digest"] == b["mask_digest"]
    mask = _bool_list(a["mask"])
    for e in range(4):
        assert _equal_lists(a["after_exchange"][e], b["after_exchange"][e]), f"exchange {e}"
        # the exchange is exactly the mean of the two local models on the masked entries
        expected = reference_exchange([a["local"][e], b["local"][e]], a["theta_start"], [mask, mask], "mean")
        assert _equal_lists(a["after_exchange"][e], expected[0])
        for rec in (a, b):
            for x, start, m in zip(rec["local"][e], rec["theta_start"], mask):
                assert torch.equal(x[~m], start[~m])  # unmasked entries never change
            assert not _equal_lists(rec["local"][e], rec["after_exchange"][e])
    assert not _equal_lists(a["local"][0], b["local"][0])  # the ranks did train on different data


def test_resume_from_state_dict_is_bit_identical(two_ranks):
    for rec in (two_ranks[0]["train"], two_ranks[1]["train"]):
        assert _equal_lists(rec["resumed_final"], rec["final"])
        k = int(sum(m.sum() for m in rec["mask"].values()))
        assert rec["resumed_counters"] == (2, 1, 2 * 4 * k, 4 * 202)
        assert rec["resumed_exchanges"] == 4
        sd = rec["state_dict"]
        assert sd["mask_digest"] == rec["mask_digest"] and sd["exchanges"] == 4 and sd["base"] is None


def test_sgd_sum_and_recomputed_mask(two_ranks):
    a, b = two_ranks[0]["train"], two_ranks[1]["train"]
    for rec in (a, b):  # resuming op='sum' mid-interval restores the synchronisation point
        assert rec["sum_base_saved"] and rec["sum_resume_equal"] and rec["sum_without_base_differs"]
    mask = _bool_list(a["mask"])
    for e in range(2):
        assert _equal_lists(a["sgd_after_exchange"][e], b["sgd_after_exchange"][e])
        for x, start, m in zip(a["sgd_after_exchange"][e], a["sgd_start"], mask):
            assert torch.equal(x[~m], start[~m])
    # rank 0's recomputed mask reached rank 1 (it passed None)
    assert a["new_mask_digest"] == b["new_mask_digest"] != a["mask_digest"]
    new = _bool_list(a["new_mask"])
    assert _equal_lists(a["recomputed_after"], b["recomputed_after"])
    for x, start, m in zip(a["recomputed_after"], a["recomputed_start"], new):
        assert torch.equal(x[~m], start[~m])


def test_disjoint_masks_merge_by_summing_updates(two_ranks):
    a, b = two_ranks[0]["train"], two_ranks[1]["train"]
    masks = [_bool_list(m) for m in a["disjoint_masks"]]
    assert all(_equal_lists(x, y) for x, y in zip(masks, [_bool_list(m) for m in b["disjoint_masks"]]))
    base = a["disjoint_start"]
    for e in range(2):
        assert _equal_lists(a["disjoint_after"][e], b["disjoint_after"][e])
        expected = reference_exchange([a["disjoint_local"][e], b["disjoint_local"][e]], base, masks, "sum")
        assert _equal_lists(a["disjoint_after"][e], expected[0])
        base = a["disjoint_after"][e]


def test_bf16_master_weights_follow_the_exchange(two_ranks):
    a, b = two_ranks[0]["train"], two_ranks[1]["train"]
    assert torch.equal(a["bf16_masters_after"], b["bf16_masters_after"])
    assert torch.equal(a["bf16_masters_after"], (a["bf16_masters_before"] + b["bf16_masters_before"]) / 2)
    assert not torch.equal(a["bf16_masters_before"], b["bf16_masters_before"])
    mask = _bool_list(a["bf16_mask"])
    masked = torch.cat([p.reshape(-1)[m.reshape(-1)] for p, m in zip(a["bf16_params_after"], mask)])
    assert torch.equal(masked, a["bf16_masters_after"].to(torch.bfloat16))
    assert a["bf16_sent"] == 4 * int(sum(m.sum() for m in mask))  # fp32 on the wire


# ---------------------------------------------------------------------------- errors
def test_mask_mismatch_names_the_ranks(three_ranks):
    for rank in three_ranks:
        kind, msg, groups = rank["errors"]["mismatch"]
        assert kind == "MaskMismatchError"
        assert "ranks 0, 2: digest" in msg and "rank 1: digest" in msg
        assert sorted(groups.values()) == [[0, 2], [1]]


def test_settings_mismatch_and_setup_failure_raise_on_every_rank(three_ranks):
    for r, rank in enumerate(three_ranks):
        kind, msg = rank["errors"]["config"]
        assert kind == "ConfigMismatchError" and "rank 2: {'op': 'sum'}" in msg
        kind, msg = rank["errors"]["setup"]
        if r == 2:  # the rank whose mask does not fit its model raises the real cause
            assert kind == "ValueError" and "does not fit the model" in msg
        else:
            assert kind == "DistributedError" and "rank 2 could not set up the mask" in msg
        assert "rank 1 passed no mask while the others passed theirs" in rank["errors"]["disjoint_missing"]


def test_masks_broadcast_and_gathered(three_ranks):
    digests = {rank["errors"]["set_mask_digest"] for rank in three_ranks}
    assert len(digests) == 1
    for rank in three_ranks:
        e = rank["errors"]
        assert e["broadcast_digest"] == e["good_digest"]
        assert "rank 2 has no mask to broadcast" in e["no_source"]
        assert e["gathered_digests"] == [three_ranks[r]["errors"]["own_digest"] for r in range(3)]
    assert three_ranks[0]["errors"]["set_mask_bytes"] > 0 and three_ranks[1]["errors"]["set_mask_bytes"] == 0


def test_a_rank_that_hangs_gives_a_timeout_error(tmp_path):
    # After a timed-out gloo collective, torch's C++ teardown at interpreter exit sometimes
    # aborts ("terminate called without an active exception", SIGABRT) while the hung peer is
    # still connected — in roughly 1 run of 6 here, with or without destroy_process_group(). The
    # results are written before that; what matters is that the rank raised in time and ended.
    res, walls = _launch(tmp_path, 2, "timeout", wait_for=[0], limit=60, ok_codes=(0, -6, 134))
    assert res[0] is not None, "rank 0 wrote no results"
    t = res[0]["timeout"]
    assert t["error"] == "CollectiveTimeoutError" and t["is_timeout_error"]
    assert t["operation"].startswith("exchange #1") and "timed out on rank 0 of 2" in t["message"]
    assert t["timeout_s"] == 3.0
    assert 2.5 < t["elapsed"] < 10
    # rank 0 exited on its own while rank 1 still hung (killed afterwards): no hang at exit either
    assert walls[0] < 40


def test_a_rank_that_dies_gives_a_collective_error(tmp_path):
    res, _ = _launch(tmp_path, 2, "die", wait_for=[0, 1], limit=60)
    d = res[0]["die"]
    assert d["error"] == "CollectiveError" and d["operation"].startswith("exchange #1")
    assert "peer process probably crashed" in d["message"]
    assert d["elapsed"] < 15


# ---------------------------------------------------------------------------- local (no process group)
def test_import_initialises_nothing_and_never_touches_cuda():
    code = r"""
import torch, torch.distributed as dist
def boom(*a, **k):
    raise AssertionError("torch.cuda was called at import time")
for name in ("is_available", "device_count", "current_device", "init", "get_device_capability", "set_device"):
    setattr(torch.cuda, name, boom)
import fishkern.distributed
from fishkern.distributed import SparseAverager, init_from_env, broadcast_mask
assert not dist.is_initialized()
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_mask_serialisation_round_trip():
    from fishkern import FishMask
    from fishkern.distributed import DistributedError, mask_from_tensors, mask_to_tensors

    m = FishMask.from_boolean(
        {"a.weight": torch.rand(5, 7) > 0.5, "a.bias": torch.zeros(5, dtype=torch.bool), "b": torch.rand(3) > 0.2},
        forced=["b"],
        provenance={"method": "test", "seed": 3},
    )
    meta, idx = mask_to_tensors(m)
    assert meta.dtype == torch.uint8 and idx.dtype == torch.int64 and idx.numel() == m.k
    back = mask_from_tensors(meta, idx)
    assert back.digest == m.digest and back == m and back.provenance["seed"] == 3
    assert list(back.shapes) == list(m.shapes)
    bad = idx.clone()
    bad[0] += 1
    with pytest.raises(DistributedError, match="digest|damaged"):
        mask_from_tensors(meta, bad)
    with pytest.raises(DistributedError, match="damaged"):
        mask_from_tensors(meta, idx[:-1])


def test_without_a_process_group_errors_are_clear(monkeypatch):
    import torch.distributed as dist

    from fishkern.distributed import DistributedError, SparseAverager, init_from_env

    assert not dist.is_initialized()
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="op must be one of"):
        SparseAverager(model, op="median")
    with pytest.raises(ValueError, match="mode must be one of"):
        SparseAverager(model, mode="mixed")
    with pytest.raises(DistributedError, match="init_from_env"):
        SparseAverager(model)
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(DistributedError, match="torchrun"):
        init_from_env(backend="gloo", timeout=5)
    assert not dist.is_initialized()


@pytest.mark.parametrize("one_group", [True, False])
def test_reading_and_writing_entries_with_the_multi_tensor_ops(one_group):
    """SparseAverager._read / _write (one gather_masked / scatter_masked_ call per device holding
    parameters) against per-parameter indexing: mixed dtypes, a channels_last weight, parameters
    without entries, a layout change after the entry set was built, and master copies. With
    one_group=False the group's buffer is not the entry set's flat layout (as with parameters on
    another device than the communication device), so the copying path runs too."""
    from types import SimpleNamespace

    from fishkern.distributed.averager import SparseAverager, _entry_set

    g = torch.Generator().manual_seed(5)
    params = [
        torch.randn(4, 3, 2, 5, generator=g).contiguous(memory_format=torch.channels_last),
        torch.randn(17, generator=g).bfloat16(),
        torch.randn(6, generator=g).half(),
        torch.randn(3, 7, generator=g, dtype=torch.float64),
        torch.randn(9, generator=g),
    ]
    idx = [torch.randperm(p.numel(), generator=g)[: p.numel() // 3].sort().values for p in params]
    idx[4] = idx[4][:0]  # a parameter without entries
    es = _entry_set(params, idx)
    assert len(es.groups) == 1 and es.groups[0].members == [0, 1, 2, 3]
    if not one_group:
        es.groups[0].spans_all = False
    params[3] = params[3].t().contiguous().t()  # the layout changes after the entry set was built
    master_idx = idx[1][::2].clone()
    master = torch.randn(master_idx.numel(), generator=g)
    links = {id(params[1]): [(master, master_idx, master_idx)]}
    av = SimpleNamespace(params=params, acc_dtype=torch.float32, _comm=SimpleNamespace(device=torch.device("cpu")))
    av._group_tensors = lambda es_, grp: SparseAverager._group_tensors(av, es_, grp)

    got = SparseAverager._read(av, es, links)
    want = torch.cat([p.reshape(-1)[i].float() for p, i in zip(params, idx)])
    at = es.starts[1] + torch.searchsorted(idx[1], master_idx)
    want[at] = master
    assert torch.equal(got, want)

    new = torch.randn(es.total, generator=g)
    before = [p.clone() for p in params]
    SparseAverager._write(av, es, new, links)
    for j, (p, i) in enumerate(zip(params, idx)):
        expect = before[j].reshape(-1).clone()
        expect[i] = new[es.starts[j] : es.starts[j + 1]].to(p.dtype)
        assert torch.equal(p.reshape(-1), expect), j
    assert params[0].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(master, new[at])  # the masters get the unrounded values
