"""SparseAverager hardening (issue 10, items 7 and 8) on real gloo process groups of 2 and 3 ranks.

7. A memory-layout change after construction (``model.to(memory_format=torch.channels_last)``)
   used to make ``exchange()`` read and write the wrong entries (precomputed memory offsets); now
   the offsets follow the current strides and results are bit-identical to contiguous parameters,
   also when only some ranks changed layout (dense operations travel in row-major order). Other
   changes (dtype, shape, replaced parameters or submodules) are refused on every rank.
8. Ranks calling different collectives (rank 0 ``exchange()``, rank 1 ``dense_exchange()``) used to
   kill a rank with SIGABRT inside gloo or leave wrong weights; now a header all-gather makes every
   rank raise ``CollectiveMismatchError`` before any payload travels, and the group stays usable.

Each scenario runs tests/distributed/_dist_hardening_worker.py as separate processes (FileStore rendezvous in
tmp_path: no ports), bounded by a few-second collective timeout and a wall-clock limit.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _multiproc import run_ranks

WORKER = Path(__file__).with_name("_dist_hardening_worker.py")

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with gloo is not available in this torch build",
)


class Run:
    """One scenario's ranks: exit codes, logs and what each rank recorded (None: nothing, e.g.
    killed by a signal before it could save)."""

    def __init__(self, scenario, world, codes, logs, records):
        self.scenario, self.world, self.codes, self.logs, self.records = scenario, world, codes, logs, records

    def how(self) -> str:
        how = {r: "ok" if c == 0 else f"killed by signal {-c}" if c < 0 else f"exit code {c}" for r, c in self.codes.items()}
        tails = "\n".join(f"--- rank {r}:\n{self.logs[r][-2000:]}" for r, c in self.codes.items() if c)
        return f"{self.scenario} on {self.world} ranks: {how}\n{tails}"

    def section(self, name: str) -> list[dict]:
        """Every rank's record of one section; fails (with the ranks' fate) if a rank lacks it."""
        for r, rec in enumerate(self.records):
            if rec is None or name not in rec:
                pytest.fail(f"rank {r} recorded no {name!r}: " + self.how())
        return [rec[name] for rec in self.records]

    def case(self, name: str, key) -> list[dict]:
        """Every rank's record of one case of a section."""
        recs = self.section(name)
        for r, rec in enumerate(recs):
            if key not in rec:
                pytest.fail(f"rank {r} recorded no {name}[{key!r}]: " + self.how())
        return [rec[key] for rec in recs]


def _launch(tmp: Path, world: int, scenario: str, limit: float = 45.0) -> Run:
    """Run ``world`` ranks of one scenario (each rank's record is kept even if a rank fails)."""
    codes, logs, records, _ = run_ranks(WORKER, tmp, world, scenario, limit=limit, cwd=tmp)
    return Run(scenario, world, codes, logs, [records[r] for r in range(world)])


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    return _launch(tmp_path_factory.mktemp("layout"), 2, "layout")


@pytest.fixture(scope="module")
def changed(tmp_path_factory):
    return _launch(tmp_path_factory.mktemp("changed"), 2, "changed")


@pytest.fixture(scope="module")
def mismatch(tmp_path_factory):
    return _launch(tmp_path_factory.mktemp("mismatch"), 3, "mismatch")


@pytest.mark.parametrize("scenario", ["layout", "changed", "mismatch"])
def test_every_rank_finishes_normally(scenario, request):
    run = request.getfixturevalue(scenario)
    assert all(c == 0 for c in run.codes.values()), run.how()


def reference(pres, base, masks, op):
    """Single-process reference of one exchange (see tests/distributed/test_distributed.py): rank-order sums
    in fp32 over the union of the masks; rank r's contribution outside its mask is the base."""
    world = len(pres)
    out = [[None] * len(base) for _ in range(world)]
    for j in range(len(base)):
        b = base[j].reshape(-1).float()
        ms = [masks[r][j].reshape(-1) for r in range(world)]
        vals = [pres[r][j].reshape(-1).float() for r in range(world)]
        union = torch.stack(ms).any(0)
        if op == "mean":
            acc = torch.where(ms[0], vals[0], b).clone()
            for r in range(1, world):
                acc = acc + torch.where(ms[r], vals[r], b)
            new = acc / world
        else:
            s = torch.zeros_like(b)
            for r in range(world):
                s = torch.where(ms[r], s + (vals[r] - b), s)
            new = b + s
        for r in range(world):
            out[r][j] = torch.where(union, new, vals[r]).to(pres[r][j].dtype).view(pres[r][j].shape)
    return out


def _same(a, b) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b))


# ---------------------------------------------------------------------------- item 7: layouts
@pytest.mark.parametrize("mode,op", [("shared", "mean"), ("shared", "sum"), ("disjoint", "sum"), ("disjoint", "mean")])
@pytest.mark.parametrize("where", ["all", "rank0"])
def test_exchange_after_channels_last_is_bit_identical_to_contiguous(layout, mode, op, where):
    world = layout.world
    masks = [layout.section("shared_mask")[0]] * world if mode == "shared" else layout.section("own_masks")[0]
    recs = layout.case("sparse", (mode, op, where))
    expected = reference([rec["pre"] for rec in recs], layout.section("start")[0], masks, op)
    union = [torch.stack([masks[q][j] for q in range(world)]).any(0) for j in range(len(masks[0]))]
    for r, rec in enumerate(recs):
        assert rec["still_channels_last"] == (where == "all" or r == 0)
        for pre, post, u in zip(rec["pre"], rec["post"], union):
            assert torch.equal(pre[~u], post[~u]), f"rank {r}: an unmasked entry changed"
            if mode == "shared":  # (disjoint sum keeps an entry only this rank trained as it is)
                assert not torch.equal(pre[u], post[u]) or not u.any(), f"rank {r}: masked entries were not averaged"
        assert _same(rec["post"], rec["twin_post"]), f"rank {r}: channels_last differs from contiguous"
        assert _same(rec["post"], expected[r]), f"rank {r}: differs from the single-process reference"
        assert _same(rec["post2"], rec["twin_post2"]), f"rank {r}: back to contiguous, the second exchange differs"


def test_dense_exchange_with_different_layouts_on_the_ranks(layout):
    recs = layout.section("dense")
    mean = []
    for j in range(len(recs[0]["pre"])):  # rank order, fp32, as dense_exchange sums
        acc = recs[0]["pre"][j].clone()
        for rec in recs[1:]:
            acc = acc + rec["pre"][j]
        mean.append(acc / layout.world)
    for r, d in enumerate(recs):
        assert d["still_channels_last"]
        assert _same(d["post"], mean), f"rank {r}: not the mean of the ranks' entries"
        assert _same(d["post"], d["twin_post"]), f"rank {r}: channels_last rank 0 changed the dense average"


@pytest.mark.parametrize("src_layout", ["channels_last", "contiguous"])
def test_sync_parameters_and_assert_in_sync_with_different_layouts(layout, src_layout):
    recs = layout.case("sync", src_layout)
    for r, rec in enumerate(recs):
        assert _same(rec["post"], recs[0]["pre"]), f"rank {r} did not receive rank 0's entries"
        assert rec["in_sync"]["error"] is None, rec["in_sync"]


# ---------------------------------------------------------------------------- item 7: refusals
def _raised_everywhere(run, section, key, *, who=None, own=None):
    """Every rank raised; ``who`` (None: every rank) raised its own ``own`` error, the others a
    fishkern.distributed error naming that rank. Nothing was written anywhere."""
    recs = run.case(section, key)
    for r, rec in enumerate(recs):
        assert rec["error"] is not None, f"{key}: rank {r} raised nothing"
        assert rec["elapsed"] < 3, f"{key}: rank {r} waited {rec['elapsed']:.1f} s (a timeout, not a decision): {rec}"
        if who is None or r == who:
            assert rec["error"] == own, (key, r, rec["error"], rec["message"])
        else:
            assert rec["is_distributed"] and f"rank {who} refused it" in rec["message"], (key, r, rec["message"])
            assert "no rank went ahead" in rec["message"]
        assert rec["unchanged"], f"{key}: rank {r}'s parameters were written"
    return [rec["message"] for rec in recs]


def test_dtype_change_is_refused_on_every_rank(changed):
    msgs = _raised_everywhere(changed, "changed", "dtype_all_ranks", own="ModelChangedError")
    assert "dtype torch.float32 -> torch.float64" in msgs[0] and "build the SparseAverager" in msgs[0]
    msgs = _raised_everywhere(changed, "changed", "dtype_rank1", who=1, own="ModelChangedError")
    assert "torch.float32 -> torch.bfloat16" in msgs[1]
    assert changed.case("changed", "dtype_rank1")[0]["error"] == "ModelChangedError"  # the others: the same class


def test_replaced_data_parameters_and_submodules_are_refused(changed):
    msgs = _raised_everywhere(changed, "changed", "data_shape_rank1", who=1, own="ModelChangedError")
    assert "'0.weight'" in msgs[1] and "shape (4, 3, 3, 3) -> (4, 3, 3, 2)" in msgs[1]
    msgs = _raised_everywhere(changed, "changed", "assign_all_ranks", own="ModelChangedError")
    assert "replaced by another tensor object" in msgs[0]
    msgs = _raised_everywhere(changed, "changed", "submodule_rank0", who=0, own="ModelChangedError")
    assert "submodule '2' was replaced" in msgs[0]


@pytest.mark.parametrize("entry", ["dense_exchange", "sync_parameters", "assert_in_sync", "verify", "set_mask"])
def test_every_entry_point_checks_the_model(changed, entry):
    _raised_everywhere(changed, "changed", f"{entry}_dtype_rank1", who=1, own="ModelChangedError")


def _exchanges_correctly_afterwards(run):
    after = run.section("after")
    assert all(a["error"] is None for a in after), after
    pres = run.section("after_pre")
    expected = reference(pres, pres[0], [run.section("mask")[0]] * run.world, "mean")
    for r, post in enumerate(run.section("after_post")):
        assert _same(post, expected[r]), f"rank {r}"


def test_group_still_exchanges_after_the_refusals(changed):
    _exchanges_correctly_afterwards(changed)


# ---------------------------------------------------------------------------- item 8: mismatches
MISMATCHES = {  # case -> (what ranks 0 and 2 called, what rank 1 called), as the message names them
    "exchange_vs_dense_exchange": ("exchange #1", "dense_exchange #1"),
    "exchange_vs_sync_parameters": ("exchange #1", "sync_parameters"),
    "exchange_vs_assert_in_sync": ("exchange #1", "assert_in_sync"),
    "dense_exchange_vs_set_mask": ("dense_exchange #1", "set_mask"),
    "verify_vs_exchange": ("verify", "exchange #1"),
    "exchange_vs_construction": ("exchange #1", "SparseAverager(...) construction"),
    "set_mask_vs_broadcast_mask": ("set_mask", "broadcast_mask"),
    "crossed_averagers": ("exchange #1 of SparseAverager #", "exchange #1 of SparseAverager #"),
    "exchange_counters_differ": ("exchange #2", "exchange #1"),
}
ARGUMENTS = {  # case -> text the message holds
    "sync_parameters_src_differs": "src differs — ranks 0, 2: 0; rank 1: 2",
    "dense_exchange_buffers_differ": "buffers differs — ranks 0, 2: 1; rank 1: 0",
    "dense_chunk_numel_differs": "dense_chunk_numel differs — ranks 0, 2: 16777216; rank 1: 7",
    "set_mask_broadcast_from_differs": "broadcast_from differs — ranks 0, 2: 0; rank 1: None",
}


def _mismatch_everywhere(run, key):
    recs = run.case("mismatch", key)
    for r, rec in enumerate(recs):
        assert rec["error"] == "CollectiveMismatchError", (key, r, rec)
        assert rec["elapsed"] < 3, f"{key}: rank {r} waited {rec['elapsed']:.1f} s"
        assert rec["unchanged"], f"{key}: rank {r}'s parameters were written"
    msgs = [rec["message"] for rec in recs]
    assert len({m.split(": ", 1)[1] for m in msgs}) == 1, f"{key}: the ranks were told different things: {msgs}"
    return msgs[0], recs


@pytest.mark.parametrize("key", list(MISMATCHES))
def test_ranks_calling_different_collectives_all_raise(mismatch, key):
    msg, recs = _mismatch_everywhere(mismatch, key)
    mine, odd = MISMATCHES[key]
    assert f"ranks 0, 2: {mine}" in msg and f"rank 1: {odd}" in msg, msg
    assert "nothing was exchanged" in msg
    ops = recs[0]["operations"]
    assert sorted(ops) == [0, 1, 2] and ops[0] == ops[2] != ops[1]


@pytest.mark.parametrize("key", list(ARGUMENTS))
def test_same_collective_with_different_arguments_all_raise(mismatch, key):
    msg, _ = _mismatch_everywhere(mismatch, key)
    assert ARGUMENTS[key] in msg, msg


@pytest.mark.parametrize(
    "key,own",
    [
        ("sync_parameters_bad_src_rank1", "ValueError"),
        ("set_mask_not_a_mask_rank1", "TypeError"),
        ("construction_bad_op_rank1", "ValueError"),
    ],
)
def test_a_local_refusal_reaches_every_rank(mismatch, key, own):
    msgs = _raised_everywhere(mismatch, "mismatch", key, who=1, own=own)
    assert msgs[1].split("\n")[0] in msgs[0]  # the others are told rank 1's reason


def test_group_still_exchanges_after_the_mismatches_with_one_header_collective(mismatch):
    _exchanges_correctly_afterwards(mismatch)
    for r, ops in enumerate(mismatch.section("after_collectives")):
        assert len(ops) == 2 and ops[0] == "exchange #1 (header)" and ops[1].startswith("exchange #1 (gather"), (r, ops)
