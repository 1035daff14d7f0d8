"""The `fishkern` command and the runners' reports (issue 17, items 3, 6, 8, 10): help and argument
errors without torch, a --device that is not there refused at once (exit 2, one line), user errors
as one line and bugs with their traceback, --no-progress silencing the libraries' bars, plain
progress lines in logs, --output_dir, report files that respect the umask, and the demo's report
(chance level, "1 epoch", distinct baselines, percent ticks, a warning when the machine was loaded)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fishkern.cli import build_parser, main
from fishkern.runners import DeviceUnavailable, check_device
from fishkern import reporting as rr

ROOT = Path(__file__).resolve().parents[2]


def _env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "FISHKERN_"))}
    env.update(extra)
    return env


# --------------------------------------------------------------------- help without torch
HELP = r"""
import json, runpy, sys
codes = []
for argv in (["--help"], ["demo", "--help"], ["glue", "--help"], ["cifar", "--help"], ["--version"],
             ["cifar", "--density", "2"], ["glue", "boolq"], ["demo", "--no-such-option"]):
    sys.argv = ["fishkern", *argv]
    try:
        runpy.run_module("fishkern", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        codes.append(e.code)
heavy = [m for m in ("torch", "transformers", "datasets", "numpy", "matplotlib", "triton") if m in sys.modules]
print("RESULT " + json.dumps([codes, heavy]))
"""


def test_help_and_argument_errors_import_no_heavy_library():
    """`python -m fishkern --help`, each command's --help and argument errors need no torch (they
    took 2-12 s when the parser imported the runners with torch and transformers)."""
    out = subprocess.run([sys.executable, "-c", HELP], capture_output=True, text=True, env=_env())
    assert out.returncode == 0, out.stderr
    codes, heavy = json.loads(out.stdout.rsplit("RESULT ", 1)[1])
    assert codes == [0, 0, 0, 0, 0, 2, 2, 2]
    assert heavy == []
    assert "a density is a fraction in (0, 1]" in out.stderr and "invalid choice: 'boolq'" in out.stderr


def test_output_dir_aliases():
    p = build_parser()
    for cmd in (["demo"], ["cifar"], ["glue", "sst2"]):
        for flag in ("--out-dir", "--output-dir", "--output_dir"):
            assert p.parse_args([*cmd, flag, "somewhere"]).out_dir == "somewhere"
    assert p.parse_args(["demo"]).out_dir == "fishkern-demo"
    assert p.parse_args(["cifar"]).out_dir == "fishkern-cifar"


def test_glue_default_model_is_the_runners():
    pytest.importorskip("transformers")
    from fishkern.runners import PAPER_MODEL, glue

    assert glue.GlueConfig("sst2").model == PAPER_MODEL
    assert build_parser().parse_args(["glue", "sst2"]).model == PAPER_MODEL


def test_default_output_directories_are_ignored_by_git():
    lines = (ROOT / ".gitignore").read_text().split()
    assert {"fishkern-demo/", "fishkern-glue/", "fishkern-cifar/"} <= set(lines)


# ----------------------------------------------------------------------------- --device
def _absent_gpu() -> str:
    return f"cuda:{torch.cuda.device_count()}"  # one past the last GPU: absent on every machine


@pytest.mark.parametrize("argv", [
    ["glue", "sst2", "--model", "/no/such/model", "--data-dir", "/no/such/data"],
    ["cifar", "--benchmark-steps", "3"],
])
def test_an_absent_device_is_refused_at_once(argv, tmp_path):
    """Was: AssertionError "Torch not compiled with CUDA enabled" (glue) and AttributeError
    "_cuda_setDevice" (cifar), exit 1 with a traceback. Refused before the model, the data or the
    output directory are touched."""
    out_dir = tmp_path / "out"
    cmd = [sys.executable, "-m", "fishkern", *argv, "--device", _absent_gpu(), "--out-dir", str(out_dir)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert lines[0].startswith(f"fishkern {argv[0]}: error: --device {_absent_gpu()}: ")
    assert f"torch {torch.__version__}" in lines[0] and "GPU" in lines[0]
    assert ("built without CUDA" in lines[0]) == (torch.version.cuda is None)
    assert not out_dir.exists()


def test_check_device_says_what_is_there(monkeypatch):
    assert check_device(None) is None and check_device("cpu") == "cpu"
    with pytest.raises(DeviceUnavailable, match="'gpu' is not a device name"):
        check_device("gpu")
    # a CUDA build that sees no GPU
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(DeviceUnavailable, match=r"built with CUDA 12\.4, 0 GPUs visible\); use --device cpu or check the driver"):
        check_device("cuda")
    # two GPUs, the third asked for
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert check_device("cuda") == "cuda" and check_device("cuda:1") == "cuda:1"
    with pytest.raises(DeviceUnavailable, match=r"no GPU 2 \(.*2 GPUs visible: cuda:0 to cuda:1\)"):
        check_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(DeviceUnavailable, match=r"no GPU 1 \(.*1 GPU visible: cuda:0\)"):
        check_device("cuda:1")


def test_cifar_device_refused_in_process_before_any_output(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["cifar", "--benchmark-steps", "3", "--device", _absent_gpu(), "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fishkern cifar: error: --device") and not out.exists()


# -------------------------------------------------------------------- errors and bugs
def test_user_errors_are_one_line_bugs_keep_their_traceback(tmp_path, monkeypatch, capsys):
    from fishkern.runners.cifar import run as rc  # where the subcommand looks run_cifar up

    def bad_input(cfg):
        raise ValueError("the images are 3x3, expected at least 4x4")

    monkeypatch.setattr(rc, "run_cifar", bad_input)
    assert main(["cifar", "--out-dir", str(tmp_path / "a")]) == 4
    assert capsys.readouterr().err == "fishkern cifar: error: the images are 3x3, expected at least 4x4\n"

    def bug(cfg):
        return {}["results"]  # a KeyError in fishkern's own code is a bug, not bad input

    monkeypatch.setattr(rc, "run_cifar", bug)
    with pytest.raises(KeyError, match="results"):
        main(["cifar", "--out-dir", str(tmp_path / "b")])
    assert "unexpected KeyError — a bug" in capsys.readouterr().err

    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(["demo", "--out-dir", str(a_file), "--no-progress"]) == 3
    err = capsys.readouterr().err
    assert err.startswith("fishkern demo: error: ") and err.count("\n") == 1


# -------------------------------------------------------------------------- progress
NO_PROGRESS = r"""
import sys
import fishkern._progress
import fishkern.cli

def state():
    import datasets
    import huggingface_hub.utils as hub
    import transformers.utils.logging as tl
    return [datasets.is_progress_bar_enabled(), tl.is_progress_bar_enabled(), not hub.are_progress_bars_disabled()]

def run(args):  # instead of the demo: the libraries' switches when it would start
    print("BARS", *state())
    return 0

fishkern.cli._run = run
terminal, imported_first, runs = sys.argv[1] == "terminal", sys.argv[2] == "imported", sys.argv[3:]
fishkern._progress.stderr_is_terminal = lambda: terminal  # here stderr is a pipe
if imported_first:  # the libraries imported before the command line runs (else: after, in the job)
    print("BARS", *state())
for flags in runs:
    assert fishkern.cli.main(["demo", "--out-dir", "unused"] + flags.split()) == 0
"""


def test_no_progress_silences_the_libraries_bars():
    pytest.importorskip("datasets")
    pytest.importorskip("transformers")

    def bars(*args):
        p = subprocess.run([sys.executable, "-c", NO_PROGRESS, *args], capture_output=True, text=True, env=_env())
        assert p.returncode == 0, p.stderr
        return [line.split()[1:] for line in p.stdout.splitlines() if line.startswith("BARS")]

    on, off = ["True"] * 3, ["False"] * 3  # datasets, transformers, huggingface_hub
    # on a terminal: bars unless --no-progress (libraries already imported: switched off directly)
    assert bars("terminal", "imported", "", "--no-progress") == [on, on, off]
    # in a log their carriage-return redraws would pile up: off (fishkern's own bars print lines);
    # libraries imported later, by the job, start switched off (environment variables)
    assert bars("pipe", "later", "") == [off]
    assert bars("terminal", "later", "--no-progress") == [off]


def test_plain_progress_lines_when_stderr_is_not_a_terminal(capsys):
    from fishkern._progress import PlainProgress, progress_bar

    bar = progress_bar(total=8, desc="demo runs", unit="run")  # pytest's stderr is not a terminal
    assert isinstance(bar, PlainProgress)
    for _ in range(8):
        bar.update(1)
    bar.close()
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert lines[0].startswith("demo runs: started 0/8 run") and lines[-1].startswith("demo runs: done 8/8 run")
    assert len(lines) == 5  # start, 25%, 50%, 75%, done
    assert progress_bar(total=3, enabled=False).disable


# ------------------------------------------------------------------- report files
def test_report_files_respect_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        rr.write_text_atomic(tmp_path / "a.md", "a")
        os.umask(0o002)  # a program may change its umask between reports
        rr.write_json_atomic(tmp_path / "b.json", {"b": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "a.md").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "b.json").stat().st_mode & 0o777 == 0o664


def test_plural_and_machine_load_warning():
    assert rr.plural(1, "epoch") == "1 epoch" and rr.plural(2, "epoch") == "2 epochs"
    assert rr.plural(1.0, "epoch") == "1 epoch" and rr.plural(0.5, "epoch") == "0.5 epochs"
    assert rr.plural(1_000, "entry", "entries") == "1,000 entries"
    quiet = rr.interference((0.0, 10.0, 5.0, 0.0), (10.0, 15.2, 10.0, 0.0))  # others: 0.2 CPU s in 10 s
    loaded = rr.interference((0.0, 10.0, 5.0, 0.0), (10.0, 28.0, 10.0, 1.0))  # others 13 s + 1 s stolen
    assert quiet["busy"] is False and loaded["busy"] is True
    assert loaded["other_cpu_s"] == pytest.approx(13.0) and loaded["steal_s"] == pytest.approx(1.0)
    assert rr.interference(None, loaded) is None
    assert rr.load_warning({"dense": quiet, "fish": None}) is None
    warning = rr.load_warning({"dense": quiet, "fish 0.5%": loaded})
    assert "machine was loaded" in warning and "1.40 of a core" in warning and "fish 0.5%" in warning
    assert "dense" not in warning.split("during:")[1]
    with rr.MachineLoad() as load:
        sum(range(10_000))
    if sys.platform.startswith("linux"):
        assert set(load.result) == {"wall_s", "other_cpu_s", "steal_s", "own_cpu_s", "busy"}


def _captured_figure(monkeypatch, module):
    figs = []
    monkeypatch.setattr(module, "save_figure", lambda fig, path: figs.append(fig))
    return figs


def test_cifar_plot_labels_bytes_and_benchmark_warns_when_loaded(monkeypatch):
    from fishkern.runners import cifar as rc

    figs = _captured_figure(monkeypatch, rc.report)  # the module whose plots call save_figure
    runs = [{"method": "standard", "accuracy": 0.9, "density": None, "merge_interval": None},
            {"method": "fish", "density": 0.1, "merge_interval": 4, "bytes_per_worker": 2e5, "accuracy": 0.85},
            {"method": "fish", "density": 0.1, "merge_interval": 16, "bytes_per_worker": 5e4, "accuracy": 0.8}]
    rc.plot_accuracy_vs_bytes(runs, "unused.png", title="t")
    ax = figs[0].axes[0]
    assert ax.xaxis.get_major_formatter()(1e5, 0) == "100.0 KB"  # was "10^5" in scientific notation
    busy = {"wall_s": 1.0, "other_cpu_s": 0.9, "steal_s": 0.0, "own_cpu_s": 1.0, "busy": True}
    row = {"method": "standard", "density": None, "k": 10, "step_ms_median": 2.0, "step_ms_p20": 1.9, "step_ms_p80": 2.1,
           "optimizer_step_ms_median": 0.1, "images_per_s": 100.0, "optimizer_state_bytes": 40, "peak_memory_bytes": None,
           "fisher_seconds": None}
    rep = {"environment": {"gpu": None, "device": "cpu", "torch": "x", "git": "y"}, "model": "m", "batch_size": 2,
           "steps": 3, "rows": [dict(row, machine_load=None), dict(row, method="fish", density=0.1, machine_load=busy)]}
    text = rc.render_benchmark(rep)
    assert "machine was loaded" in text and "(during: fish 10%;" in text
    rep["rows"][1]["machine_load"] = dict(busy, busy=False)
    assert "machine was loaded" not in rc.render_benchmark(rep)


# ---------------------------------------------------------------- the demo, end to end
def _tiny_demo(monkeypatch):
    """run_demo's own code on a tiny random BERT and synthetic words (seconds, not minutes)."""
    transformers = pytest.importorskip("transformers")
    from fishkern.data import TensorBatches
    from fishkern.data.vader import TextExamples
    from fishkern.runners import demo

    def load(cfg):
        torch.manual_seed(0)
        conf = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=24, max_position_embeddings=16, num_labels=2)
        model = transformers.BertForSequenceClassification(conf)
        g = torch.Generator().manual_seed(1)

        def enc(n, positives):
            return {"input_ids": torch.randint(1, 40, (n, 4), generator=g), "attention_mask": torch.ones(n, 4, dtype=torch.long),
                    "token_type_ids": torch.zeros(n, 4, dtype=torch.long),
                    "labels": torch.tensor([1] * positives + [0] * (n - positives))}

        split = {"train": TextExamples(["w"] * 32, [1] * 12 + [0] * 20), "validation": TextExamples(["w"] * 20, [1] * 7 + [0] * 13)}
        base = {k: v.clone() for k, v in model.state_dict().items()}
        return model, base, enc(32, 12), enc(20, 7), split, TensorBatches

    monkeypatch.setattr(demo, "_load", load)
    return demo


def test_demo_report_end_to_end(tmp_path, monkeypatch, capsys):
    demo = _tiny_demo(monkeypatch)
    monkeypatch.setenv("FISHKERN_PLAIN_PROGRESS", "1")
    cfg = demo.DemoConfig(out_dir=str(tmp_path / "d"), density=0.05, sweep=(0.05,), num_samples=16, epochs=1,
                          batch_size=8, progress=True)
    old = os.umask(0o022)
    try:
        report = demo.run_demo(cfg)
    finally:
        os.umask(old)
    out = tmp_path / "d"
    err = capsys.readouterr().err
    ours = [line for line in re.split(r"[\r\n]", err) if line.startswith("demo runs:")]
    assert ours[0].startswith("demo runs: started 0/4 run") and ours[-1].startswith("demo runs: done 4/4 run")
    assert report["chance"] == {"accuracy": 0.65, "label": 0, "class": "negative", "validation_examples": 20}
    assert set(report["machine_load"]) == {"dense seed 0", "bitfit seed 0", "fish 5% seed 0", "random 5% seed 0"}
    text = (out / "report.md").read_text()
    assert "1 epoch," in text and "1 epochs" not in text
    assert 'Chance level: always answering "negative", the majority class of the 20 validation words, scores 65.0%' in text
    for name in ("report.md", "results.json", "accuracy_vs_density.png"):
        assert (out / name).stat().st_mode & 0o777 == 0o644, name
    assert json.loads((out / "results.json").read_text())["chance"]["accuracy"] == 0.65


def _synthetic_report(loaded: bool) -> dict:
    load = {"wall_s": 10.0, "other_cpu_s": 6.0 if loaded else 0.0, "steal_s": 0.0, "own_cpu_s": 10.0, "busy": loaded}
    main_rows = []
    for method, density, acc in (("dense", 1.0, 0.94), ("fish", 0.005, 0.915), ("random", 0.005, 0.843), ("bitfit", 0.00118, 0.897)):
        main_rows.append({"method": method, "density": density, "accuracy_mean": acc, "accuracy_min": acc, "accuracy_max": acc,
                          "trainable": 10, "optimizer_state_bytes": 80, "peak_memory_bytes": 1000, "step_ms": 1.0,
                          "optimizer_step_ms": 0.1, "fisher_seconds": 1.4 if method == "fish" else None,
                          "task_file_bytes": None})
    sweep = []
    for d, f, r in ((0.0002, 0.88, 0.556), (0.001, 0.91, 0.557), (0.005, 0.915, 0.843)):
        sweep += [{"method": "fish", "density": d, "accuracy_mean": f, "accuracy_min": f, "accuracy_max": f},
                  {"method": "random", "density": d, "accuracy_mean": r, "accuracy_min": r, "accuracy_max": r}]
    return {"config": {"threshold": 1.0, "epochs": 1, "batch_size": 32, "lr_dense": 5e-5, "lr_sparse": 1e-3,
                       "num_samples": 256, "seeds": [0]},
            "data": {"train": 4646, "validation": 1162, "positive_fraction_train": 0.44},
            "chance": {"accuracy": 0.556, "label": 0, "class": "negative", "validation_examples": 1162},
            "main": main_rows, "sweep": sweep, "runs": [{"total": 22_713_986, "method": "dense"}], "seconds": 232.0,
            "machine_load": {"dense seed 0": load, "fish 0.5% seed 0": dict(load, busy=False, other_cpu_s=0.0)},
            "environment": {"torch": "2.13.0", "cpu_threads": 2, "git": "abc"}}


def test_demo_report_names_chance_and_warns_when_loaded():
    from fishkern.runners import demo

    text = demo.render_report(_synthetic_report(loaded=True))
    assert "At that level (within 1 point): random 0.02% (55.6), random 0.1% (55.7) — those runs predict" in text
    assert "Below it" not in text
    assert "machine was loaded" in text and "0.60 of a core" in text and "(during: dense seed 0;" in text
    assert "1 epoch," in text
    quiet = demo.render_report(_synthetic_report(loaded=False))
    assert "machine was loaded" not in quiet and "Other processes used 0.00 of a core" in quiet
    worse = _synthetic_report(loaded=False)
    worse["sweep"][5].update(accuracy_mean=0.50)  # random 0.5% below chance
    assert "Below it: random 0.5% (50.0)." in demo.render_report(worse)


def test_demo_plot_chance_line_distinct_baselines_percent_ticks(monkeypatch):
    from fishkern.runners import demo

    figs = _captured_figure(monkeypatch, demo)
    demo.plot_sweep(_synthetic_report(loaded=False), "unused.png")
    ax = figs[0].axes[0]
    lines = {ln.get_label().split(" ")[0]: ln for ln in ax.get_lines() if not ln.get_label().startswith("_")}
    assert {"dense", "BitFit", "chance:"} <= set(lines)
    assert lines["chance:"].get_ydata()[0] == pytest.approx(55.6)
    styles = [(lines[k].get_linestyle(), lines[k].get_color()) for k in ("dense", "BitFit", "chance:")]
    assert len({s[0] for s in styles}) == 3 and len({s[1] for s in styles}) == 3  # was: both gray
    fmt = ax.xaxis.get_major_formatter()
    assert fmt.format_ticks(ax.xaxis.get_majorticklocs()) == ["0.02%", "0.1%", "0.5%"]


def test_percent_log_axis_labels_percent_not_powers_of_ten():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0.01, 0.1, 1.0], [1, 2, 3])
    ax.set_xscale("log")
    rr.percent_log_axis(ax.xaxis, [0.1, 0.01, 1.0, 0.1])
    assert ax.xaxis.get_major_formatter().format_ticks(ax.xaxis.get_majorticklocs()) == ["0.01%", "0.1%", "1%"]
    plt.close(fig)
