"""The benchmarks' shared pieces and the split Fisher benchmark, on a tiny model (seconds): every
method runs, the scores of the loop and vmap match fishkern's, and the report renders. No timings
are asserted."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        import _common

        from fisher import cli, load, methods, render, timing, workloads

        yield {"C": _common, "cli": cli, "load": load, "methods": methods, "render": render, "timing": timing,
               "workloads": workloads, "Quiet": load.Quiet}
    finally:  # the benchmarks' top-level names (_common, fisher) leave with their path
        sys.path.remove(str(BENCH))
        for name in [m for m in sys.modules if m == "_common" or m == "fisher" or m.startswith("fisher.")]:
            del sys.modules[name]


def test_common_formatting_and_files(bench, tmp_path):
    C = bench["C"]
    assert [C.fmt_bytes(x) for x in (None, 0, 999, 1000, 441_350_000, 2.68e9, -1200)] == \
        ["n/a", "0 B", "999 B", "1.00 kB", "441.35 MB", "2.68 GB", "-1.20 kB"]
    assert C.md_table(["a", "b"], [["1", "2"]]) == "| a | b |\n|---|---|\n| 1 | 2 |"
    C.write_json(tmp_path / "r.json", {"x": 1, "p": tmp_path})  # a Path is written with str()
    assert json.loads((tmp_path / "r.json").read_text()) == {"x": 1, "p": str(tmp_path)}
    assert C.command_line(["--quick"]) == "main(['--quick'])"
    assert len(C.source_digest()) == 16


def test_benchmark_resnet_is_the_package_model(bench):
    from fishkern.models import CifarResNet, resnet34_cifar

    C = bench["C"]
    with torch.device("meta"):
        full, quick = C.build_model("resnet34"), C.build_model("resnet34", quick=True)
    assert type(full) is CifarResNet and C.count_params(full) == C.RESNET34_PARAMS == 21_282_122
    assert [k for k in full.state_dict()] == [k for k in resnet34_cifar().state_dict()]
    assert quick.blocks == (1, 1, 1, 1) and quick.widths == (64, 128, 256, 512)


def test_run_child_protocol(bench, tmp_path):
    C = bench["C"]
    script = tmp_path / "child.py"
    script.write_text("import json, sys\nspec = json.loads(sys.argv[2])\nprint('noise')\n"
                      "print('CHILD_RESULT ' + json.dumps({'twice': 2 * spec['x']}))\n")
    result, proc = C.run_child(script, {"x": 21})
    assert result == {"twice": 42} and proc.returncode == 0
    script.write_text("import sys\nsys.exit(3)\n")
    result, proc = C.run_child(script, {})
    assert result is None and proc.returncode == 3


def test_fisher_benchmark_on_a_tiny_model(bench, monkeypatch):
    """fishkern (with and without its self-check), the loop and the floor through the benchmark's
    own path. vmap is left out: its first call imports torch.func's tracing stack, which alone
    takes longer than this file may (the quick benchmark run exercises it)."""
    from fishkern.models import cifar_resnet

    wls, timing, render, cli = bench["workloads"], bench["timing"], bench["render"], bench["cli"]
    torch.manual_seed(0)
    model = cifar_resnet(blocks=(1,), widths=(4,), num_classes=3).eval()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(3, 3, 8, 8, generator=g), torch.randint(0, 3, (3,), generator=g)) for _ in range(2)]
    n = 5  # the last batch is cut
    wl = wls.Workload("tiny", "tiny ResNet", "a tiny ResNet", hf=False, synthetic=True, n=n, batch_size=3, model=model,
                      batches=batches, vmap_chunk=2, loop_n=n, vmap_n=n, data_stats={"params": 1})
    assert sum(wls.batch_size(b) for b in wls.iter_samples(batches, n)) == n
    args = cli.parse_args(["--device", "cpu", "--reps", "1", "--slow-reps", "1", "--skip-memory", "--no-profile"])
    methods = ["fishkern", "fishkern-nocheck", "loop", "floor"]
    # not under test, and slow on a loaded machine: the 1024² matmul probes and a gc.collect() per call
    monkeypatch.setattr(timing, "probe", lambda cpu: {"loadavg": None})
    monkeypatch.setattr(timing, "free_memory", lambda: None)
    monkeypatch.setattr(bench["load"], "free_memory", lambda: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: a second thread only waits for a core
    try:
        w = timing.bench_workload(wl, args, torch.device("cpu"), methods, bench["Quiet"](0, 0, 0))
    finally:
        torch.set_num_threads(threads)
    for m in methods:
        r = w["methods"][m]
        assert not r.get("error"), (m, r.get("error"))
        assert len(r["calls"]) == 1 and r["time_for_n_s"] > 0 and r["n_measured"] == n
    # the loop computes the same Fisher as fishkern, on the same samples
    assert set(w["checks"]) == {"loop"} and w["checks"]["loop"]["n"] == n and w["checks"]["loop"]["max_rel_error"] < 1e-4
    assert {"loop/fishkern", "fishkern/floor", "fishkern/fishkern-nocheck"} <= set(w["ratios"])
    report = {"device": "cpu", "environment": {"device_description": "test", "python": "3", "torch": torch.__version__,
                                               "transformers": None, "triton": None, "fishkern": "x"},
              "git": None, "fishkern_source_sha256": "0", "command": "test", "timestamp": "now", "timing_method": "t",
              "settings": {"quick": True, "reps": 1, "slow_reps": 1, "vmap_attn": "eager"}, "workloads": [w]}
    md = render.render(report)
    assert "## tiny ResNet" in md and "| method (N=5) |" in md
    assert md.count("| not measured | not measured |") == len(methods)  # no memory children in this run


def test_bench_fisher_entry_point(bench):
    """The memory children run the entry script; its options are the CLI's (``--help`` is not run
    here: a fresh interpreter importing torch costs more than this whole file)."""
    from fisher import memory

    assert memory.ENTRY == BENCH / "bench_fisher.py" and memory.ENTRY.is_file()
    assert "from fisher.cli import main" in memory.ENTRY.read_text()
    args = bench["cli"].parse_args(["--quick", "--device", "cpu"])
    assert args.skip_memory and args.reps == 2 and args.slow_reps == 1
    assert args.workloads == ["minilm-vader", "minilm-synth-t64", "minilm-synth-t128", "resnet34-cifar"]
    with pytest.raises(SystemExit):
        bench["cli"].parse_args(["--reps", "0"])


def test_workload_configs_and_goals(bench):
    """Every entry is complete and its goals name ratios the report computes; verdicts follow the
    comparison, say when N differs from the goal's, and a missing ratio is 'not measured'."""
    from fisher import configs, goals, methods

    known = {key for _a, _b, key in methods.RATIOS} | {"self-check overhead", "memory fishkern/floor"}
    for name, cfg in configs.CONFIGS.items():
        assert cfg.name == name and cfg.n >= cfg.quick_n >= 1 and cfg.batch >= 1 and "{n}" in cfg.title
        assert set(cfg.subsets_cpu) | set(cfg.subsets_cuda) <= set(bench["workloads"].SUBSET_METHODS)
        for g in cfg.goals:
            assert g.ratio in known and g.op in goals.OPS, (name, g)
    g = (configs.Goal("loop/fishkern", ">=", 5, at_n=256), configs.Goal("fishkern/floor", "<=", 1.5),
         configs.Goal("self-check overhead", "<=", 0.1))
    v = goals.evaluate(g, {"loop/fishkern": 6.0, "loop/fishkern (min)": 7.0, "fishkern/floor": 1.6}, n=64)
    assert [x["verdict"] for x in v] == ["MET", "NOT MET", "not measured"]
    assert v[0]["value_min"] == 7.0 and "N=256" in v[0]["note"] and v[1]["note"] == ""
    w = {"workload": "w", "ratios": {"fishkern/fishkern-nocheck": 1.25, "fishkern/fishkern-nocheck (min)": 1.125},
         "methods": {}}
    rows = [{"workload": "w", "method": "fishkern", "peak_growth_bytes": 300},
            {"workload": "w", "method": "floor", "peak_growth_bytes": 200},
            {"workload": "other", "method": "floor", "peak_growth_bytes": 1}]
    d = goals.derived_ratios(w, rows)
    assert d == {"self-check overhead": 0.25, "self-check overhead (min)": 0.125, "memory fishkern/floor": 1.5}
    md = "\n".join(bench["render"].goals_lines(goals.evaluate(g[2:], d, n=5)))
    assert "| self-check overhead <= 10% | 25% | 12% | **NOT MET** |" in md
    # a goal against the loop carries the machine's ceiling loop/floor, and says when it is out of reach
    c = goals.evaluate(g[:2], {"loop/fishkern": 2.0, "loop/floor": 2.5, "fishkern/floor": 1.2}, n=256)
    assert c[0]["ceiling"] == 2.5 and "2.50×: out of reach on this machine" in c[0]["note"]
    assert c[1]["ceiling"] is None and c[1]["note"] == ""
    c = goals.evaluate(g[:1], {"loop/fishkern": 2.0, "loop/floor": 6.0}, n=256)
    assert "within reach" in c[0]["note"]
    assert goals.evaluate(g[:1], {"loop/fishkern": 2.0}, n=256)[0]["ceiling"] is None


def test_backpack_not_importable_is_reported_not_run(bench, monkeypatch):
    """Where BackPACK cannot run, its row says why and the other methods go on."""
    from fishkern.models import cifar_resnet

    wls, timing, methods, cli = bench["workloads"], bench["timing"], bench["methods"], bench["cli"]
    monkeypatch.setattr(methods, "backpack_available", lambda: "backpack-for-pytorch not importable (test)")
    monkeypatch.setattr(timing, "probe", lambda cpu: {"loadavg": None})
    model = cifar_resnet(blocks=(1,), widths=(4,), num_classes=3).eval()
    batches = [(torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2,)))]
    wl = wls.Workload("tiny", "tiny", "tiny", hf=False, synthetic=True, n=2, batch_size=2, model=model,
                      batches=batches, vmap_chunk=2, loop_n=2, vmap_n=2, data_stats={"params": 1})
    args = cli.parse_args(["--device", "cpu", "--reps", "1", "--slow-reps", "1", "--skip-memory", "--no-profile"])
    w = timing.bench_workload(wl, args, torch.device("cpu"), ["backpack", "floor"], bench["Quiet"](0, 0, 0))
    assert w["methods"]["backpack"]["error"] == "not run: backpack-for-pytorch not importable (test)"
    assert not w["methods"]["backpack"]["calls"] and len(w["methods"]["floor"]["calls"]) == 1


def test_backpack_scores_match_fishkern_where_installed(bench, monkeypatch):
    """Where backpack-for-pytorch is installed (it is not a dependency), its SumGradSquared with a
    sum-reduced loss is the same Fisher as fishkern's on a tiny conv + BatchNorm (eval) model."""
    pytest.importorskip("backpack")
    from fishkern.models import cifar_resnet

    wls, methods = bench["workloads"], bench["methods"]
    torch.manual_seed(0)
    model = cifar_resnet(blocks=(1,), widths=(4,), num_classes=3).eval()
    batches = [(torch.randn(3, 3, 8, 8), torch.randint(0, 3, (3,))) for _ in range(2)]
    wl = wls.Workload("tiny", "tiny", "tiny", hf=False, synthetic=True, n=5, batch_size=3, model=model,
                      batches=batches, vmap_chunk=2, loop_n=5, vmap_n=5, data_stats={"params": 1})
    methods.prepare("backpack", wl)
    got, info = methods.run_backpack(wl, 5)
    ref, _ = methods.run_fishkern(wl, 5, "auto")
    assert set(got) == set(ref)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-6 * float(ref[k].max()))


def test_lm_fisher_benchmark_on_a_tiny_run(bench, monkeypatch):
    """bench_fisher_lm.py end to end at toy sizes (2 sequences of 8 tokens, no memory children):
    every method runs, fishkern matches the loop, the table renders. No timings are asserted."""
    import bench_fisher_lm as B

    import transformers as tr

    real = tr.LlamaConfig

    def small(**kw):  # the benchmark's shape, shrunk: what is tested is the plumbing
        kw.update(vocab_size=64, hidden_size=16, intermediate_size=24, num_attention_heads=2, num_key_value_heads=1)
        return real(**kw)

    monkeypatch.setattr(tr, "LlamaConfig", small)
    report = B.main(["--quick", "--n", "2", "--batch", "2", "--tokens", "8", "--loop-samples", "2", "--reps", "1",
                     "--skip-memory"])
    assert [v["tied"] for v in report["variants"]] == [False, True]
    for v in report["variants"]:
        assert set(v["methods"]) == {"floor", "fishkern", "fishkern-nocheck", "loop"}
        assert v["max_rel_error_vs_loop"] < 1e-4
        assert all(r > 0 for k, r in v["ratios"].items() if k != "self-check share")
    md = B.render(report)
    assert "| untied |" in md and "| tied |" in md and "fishkern / floor" in md


def test_sparse_backward_benchmark_plumbing(bench):
    """bench_sparse_backward.py's pieces at toy sizes, in this process: each method's child run on a
    tiny BERT, the layer-kernel table, the report. No timings are asserted."""
    import bench_sparse_backward as B

    rows = []
    for method in B.METHODS:
        spec = dict(model="bert-quick", method=method, density=None if method == "dense" else 0.005, device="cpu",
                    quick=True, steps=1, warmup=1, mask_file=None, batch=2, tokens=16, batch_desc="2 x 16")
        rows.append(B.child(spec))
    assert rows[0]["layers_sparse"] == 0 and rows[1]["layers_sparse"] == 0
    assert rows[2]["layers_sparse"] > 0 and rows[2]["weight_grad_bytes_avoided"] > 0
    assert all(r["median_s"] > 0 for r in rows)
    layers = B.layer_table(torch.device("cpu"), quick=True)
    assert {r["density"] for r in layers} == set(B.LAYER_DENSITIES)
    assert all(r["torch_sampled_addmm_ms"] > 0 for r in layers)
    report = {"device": "cpu", "command": "x", "date": "d", "git": "g", "load": "quiet", "steps": rows,
              "failures": [], "layer_tokens": 128, "layer_reps": 3, "layers": layers,
              "environment": {"device_description": "cpu", "torch": torch.__version__, "transformers": "t"}}
    md = B.render(report)
    assert "| bert-quick |" in md and "fish+sparse" in md and "sampled speedup" in md and "sampled_addmm" in md
