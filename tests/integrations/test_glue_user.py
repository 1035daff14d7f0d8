"""What a GLUE user meets (issue 17): the original GLUE TSVs as downloaded, a missing --model
directory, no empty output directory after a failed run, one Fisher pass per N in a density
sweep, and the report and plot (epoch plural, chance level, percent ticks, baseline styles).

The fixture TSVs below are made up, in the original GLUE layouts (header, column order, label
spelling); they are not GLUE data."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest

datasets = pytest.importorskip("datasets")

from fishkern.data import load_glue  # noqa: E402
from fishkern.runners import glue as glue_runner  # noqa: E402
from fishkern.runners.glue import GlueConfig, chance_level, check_model_path, render_glue, run_glue  # noqa: E402


def write_tsv(path: Path, lines: list[list[str]], bom: bool = False) -> None:
    """A TSV as the GLUE download writes it: tab-separated, no quoting."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join("\t".join(fields) + "\n" for fields in lines)
    path.write_text(("\ufeff" if bom else "") + text, encoding="utf-8")


# ------------------------------------------------------------------------ the original layouts
COLA_TRAIN = [  # no header: source, label, original label, sentence
    ["ab01", "1", "", "The dog chased the ball across the yard."],
    ["ab01", "0", "*", "Ball the chased dog the."],
    ["cd07", "1", "", "She wondered whether it would rain."],
]
COLA_DEV = [["ef12", "0", "*", "He seems sleeping."], ["ef12", "1", "", "He seems to be sleeping."]]

MRPC_HEADER = ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]
MRPC_TRAIN = [MRPC_HEADER,
              ["1", "1001", "1002", "The firm reported higher profits on Monday.", "On Monday the firm said profits rose."],
              ["0", "1003", "1004", "Rain fell all week in the valley.", "The mayor opened a new bridge."]]
MRPC_DEV = [MRPC_HEADER, ["1", "1005", "1006", "Shares closed up 3 percent.", "The stock ended 3 percent higher."]]
MRPC_TEST = [["index", "#1 ID", "#2 ID", "#1 String", "#2 String"], ["0", "1007", "1008", "A cat sleeps.", "A cat naps."]]

QQP_HEADER = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
QQP_TRAIN = [QQP_HEADER,
             ["0", "1", "2", "How do I learn to cook rice?", "What is the best way to cook rice?", "1"],
             ["1", "3", "4", "Why is the sea salty?", "How far away is the moon?", "0"],
             ["2", "5", "6", "A broken row without its second question"],  # the kind of row QQP's train.tsv has
             ["3", "7", "8", "Is green tea healthy?", "Is drinking green tea good for you?", "1"]]
QQP_DEV = [QQP_HEADER, ["4", "9", "10", "Can dogs eat grapes?", "Are grapes safe for dogs?", "1"]]

STSB_HEADER = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2", "score"]
STSB_TRAIN = [STSB_HEADER,
              ["0", "main-captions", "MSRvid", "2012test", "0001", "none", "none", "A plane is taking off.",
               "An airplane is leaving the runway.", "5.000"],
              ["1", "main-news", "headlines", "2015", "0042", "none", "none", "Markets fell sharply.",
               "A child plays in the park.", "0.200"]]
STSB_DEV = [STSB_HEADER,
            ["0", "main-forums", "answers", "2016", "0007", "none", "none", "Use a sharper knife.",
             "A sharp knife works better.", "3.750"]]

MNLI_TRAIN_HEADER = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
                     "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"]
MNLI_DEV_HEADER = MNLI_TRAIN_HEADER[:11] + ["label2", "label3", "label4", "label5", "gold_label"]


def _mnli_row(i: int, premise: str, hypothesis: str, gold: str, dev: bool) -> list[str]:
    parses = ["( ( A b ) )", "( ( C d ) )", "(ROOT (S (NP A) (VP b)))", "(ROOT (S (NP C) (VP d)))"]
    labels = [gold] * (5 if dev else 1)
    return [str(i), f"{100 + i}", f"{100 + i}e", "fiction", *parses, premise, hypothesis, *labels, gold]


MNLI_TRAIN = [MNLI_TRAIN_HEADER,
              _mnli_row(0, "A man is playing a guitar on stage.", "A man is making music.", "entailment", False),
              _mnli_row(1, "The shop opens at nine.", "The shop is run by a family.", "neutral", False),
              _mnli_row(2, "Two children are asleep.", "The children are running a race.", "contradiction", False)]
MNLI_DEV_M = [MNLI_DEV_HEADER, _mnli_row(0, "It rained all day.", "The ground got wet.", "entailment", True),
              _mnli_row(1, "She left early.", "She stayed until the end.", "contradiction", True)]
MNLI_DEV_MM = [MNLI_DEV_HEADER, _mnli_row(0, "The train was late.", "Someone was waiting.", "neutral", True)]

SST2_TRAIN = [["sentence", "label"], ["a warm , funny film ", "1"], ["dull and far too long ", "0"]]
QNLI_TRAIN = [["index", "question", "sentence", "label"],
              ["0", "When was the bridge built?", "The bridge was built in 1890.", "entailment"],
              ["1", "Who painted it?", "The museum opens at ten.", "not_entailment"]]
RTE_TRAIN = [["index", "sentence1", "sentence2", "label"],
             ["0", "The company hired forty workers.", "The company hired workers.", "entailment"],
             ["1", "The river froze in January.", "The river is in Spain.", "not_entailment"]]
WNLI_TRAIN = [["index", "sentence1", "sentence2", "label"],
              ["0", "The cup did not fit in the box because it was too big.", "The cup was too big.", "1"],
              ["1", "The cup did not fit in the box because it was too big.", "The box was too big.", "0"]]


def test_cola_without_a_header(tmp_path):
    write_tsv(tmp_path / "train.tsv", COLA_TRAIN)
    write_tsv(tmp_path / "dev.tsv", COLA_DEV)
    dd = load_glue("cola", tmp_path)
    assert dd["train"]["sentence"] == [r[3] for r in COLA_TRAIN]  # the first line is an example, not a header
    assert dd["train"]["label"] == [1, 0, 1]  # 1 = acceptable, as Hugging Face's ClassLabel
    assert dd["train"].features["label"].names == ["unacceptable", "acceptable"]
    assert dd["train"]["idx"] == [0, 1, 2]
    assert dd["validation"]["label"] == [0, 1]


def test_mrpc_original_columns_and_bom(tmp_path):
    write_tsv(tmp_path / "train.tsv", MRPC_TRAIN, bom=True)  # the MSR files start with a byte-order mark
    write_tsv(tmp_path / "dev.tsv", MRPC_DEV)
    write_tsv(tmp_path / "test.tsv", MRPC_TEST)
    dd = load_glue("mrpc", tmp_path, splits=["train", "validation", "test"])
    assert dd["train"]["sentence1"] == [MRPC_TRAIN[1][3], MRPC_TRAIN[2][3]]
    assert dd["train"]["sentence2"] == [MRPC_TRAIN[1][4], MRPC_TRAIN[2][4]]
    assert dd["train"]["label"] == [1, 0]  # Quality 1 = equivalent
    assert dd["validation"]["label"] == [1]
    assert dd["test"]["sentence1"] == ["A cat sleeps."] and dd["test"]["label"] == [-1]  # unlabelled


def test_qqp_skips_broken_rows_as_hugging_face_does(tmp_path):
    write_tsv(tmp_path / "train.tsv", QQP_TRAIN)
    write_tsv(tmp_path / "dev.tsv", QQP_DEV)
    with pytest.warns(UserWarning, match=r"train\.tsv: skipped 1 row\(s\) .*line\(s\) 4\)"):
        dd = load_glue("qqp", tmp_path)
    assert dd["train"]["question1"] == [QQP_TRAIN[1][3], QQP_TRAIN[2][3], QQP_TRAIN[4][3]]
    assert dd["train"]["label"] == [1, 0, 1]
    assert dd["train"]["idx"] == [0, 1, 3]  # the row number, as Hugging Face's idx (the broken row 2 dropped)
    assert dd["validation"]["question2"] == ["Are grapes safe for dogs?"]


def test_stsb_original_columns(tmp_path):
    write_tsv(tmp_path / "train.tsv", STSB_TRAIN)
    write_tsv(tmp_path / "dev.tsv", STSB_DEV)
    dd = load_glue("stsb", tmp_path)
    assert dd["train"]["sentence1"] == ["A plane is taking off.", "Markets fell sharply."]
    assert dd["train"]["label"] == pytest.approx([5.0, 0.2])
    assert dd["train"].features["label"].dtype == "float32"
    assert dd["validation"]["label"] == pytest.approx([3.75])


def test_mnli_original_columns_with_dev_label_columns(tmp_path):
    d = tmp_path / "mnli"  # in the task's sub-directory, as the GLUE download unpacks it
    write_tsv(d / "train.tsv", MNLI_TRAIN)
    write_tsv(d / "dev_matched.tsv", MNLI_DEV_M)
    write_tsv(d / "dev_mismatched.tsv", MNLI_DEV_MM)
    write_tsv(d / "test_matched.tsv", [MNLI_TRAIN_HEADER[:10], MNLI_TRAIN[1][:10]])
    dd = load_glue("mnli", tmp_path, splits=["train", "validation_matched", "validation_mismatched", "test_matched"])
    assert dd["train"]["premise"] == [r[8] for r in MNLI_TRAIN[1:]]
    assert dd["train"]["hypothesis"] == [r[9] for r in MNLI_TRAIN[1:]]
    assert dd["train"]["label"] == [0, 1, 2]  # entailment, neutral, contradiction
    assert dd["validation_matched"]["label"] == [0, 2]
    assert dd["validation_mismatched"]["label"] == [1]
    assert dd["test_matched"]["label"] == [-1]


@pytest.mark.parametrize("task, lines, fields, labels", [
    ("sst2", SST2_TRAIN, {"sentence": 0}, [1, 0]),
    ("qnli", QNLI_TRAIN, {"question": 1, "sentence": 2}, [0, 1]),  # entailment 0, not_entailment 1
    ("rte", RTE_TRAIN, {"sentence1": 1, "sentence2": 2}, [0, 1]),
    ("wnli", WNLI_TRAIN, {"sentence1": 1, "sentence2": 2}, [1, 0]),  # WNLI's files hold 0/1: 1 = entailment
])
def test_original_layouts_with_hugging_face_names(tmp_path, task, lines, fields, labels):
    write_tsv(tmp_path / "train.tsv", lines)
    dd = load_glue(task, tmp_path, splits=["train"])
    for column, j in fields.items():
        assert dd["train"][column] == [r[j] for r in lines[1:]]
    assert dd["train"]["label"] == labels


def test_a_file_in_no_layout_names_the_expected_columns(tmp_path):
    write_tsv(tmp_path / "train.tsv", [["text", "target"], ["good", "1"]])
    with pytest.raises(ValueError, match=r"GLUE mrpc needs sentence1, sentence2, label \(the Hugging Face columns\) "
                                         r"or #1 String, #2 String, Quality \(the original GLUE TSV: Quality, #1 ID"):
        load_glue("mrpc", tmp_path, splits=["train"])
    with pytest.raises(ValueError, match=r"GLUE cola needs sentence, label .* without a header line, .*"
                                         r"source, label, original label, sentence \(the file has text, target\)"):
        load_glue("cola", tmp_path, splits=["train"])
    with pytest.raises(ValueError, match=r"premise, hypothesis, label .* or sentence1, sentence2, gold_label"):
        load_glue("mnli", tmp_path, splits=["train"])


def test_hugging_face_layout_still_refuses_short_rows(tmp_path):
    write_tsv(tmp_path / "train.tsv", [["question1", "question2", "label"], ["a?", "b?", "1"], ["c?"]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=r"train\.tsv, line 3: expected 3 fields .*got 1"):
            load_glue("qqp", tmp_path, splits=["train"])


# ------------------------------------------------------------------------ --model, output directory
def _sst2_data(d: Path) -> Path:
    write_tsv(d / "train.tsv", [["sentence", "label"]] + [[f"a {w} film", str(i % 2)] for i, w in enumerate("abcdefgh")])
    write_tsv(d / "dev.tsv", [["sentence", "label"], ["a b film", "0"], ["a c film", "1"]])
    return d


def test_missing_model_directory_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for value in ("./my-bert", str(tmp_path / "nowhere"), "~/no-such-model-dir-fishkern", "models/bert/large"):
        with pytest.raises(FileNotFoundError, match="no model directory at"):
            check_model_path(value)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match="is a file, not a model directory"):
        check_model_path("./weights.bin")
    for hub_id in ("bert-large-cased-whole-word-masking", "google-bert/bert-base-cased"):
        check_model_path(hub_id)  # hub ids are left to Hugging Face
    (tmp_path / "here").mkdir()
    check_model_path("./here")
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match=r"no model directory at .*my-bert"):
        run_glue(GlueConfig(task="sst2", model="./my-bert", data_dir=str(_sst2_data(tmp_path / "data")),
                            out_dir=str(out), progress=False))
    assert not out.exists()


def test_failed_run_leaves_no_empty_output_directory(tmp_path):
    transformers = pytest.importorskip("transformers")  # noqa: F841 - the runner needs it
    model = tmp_path / "model"
    model.mkdir()
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_glue(GlueConfig(task="sst2", model=str(model), data_dir=str(tmp_path / "no-data"), out_dir=str(out),
                            progress=False))
    assert not out.exists()
    # a directory that was there before stays, with the user's files; no empty task directory in it
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileNotFoundError):
        run_glue(GlueConfig(task="sst2", model=str(model), data_dir=str(tmp_path / "no-data"), out_dir=str(out),
                            progress=False))
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    (tmp_path / "a-file").write_text("")
    with pytest.raises(NotADirectoryError, match="a-file is a file"):
        run_glue(GlueConfig(task="sst2", model=str(model), data_dir=str(tmp_path / "no-data"),
                            out_dir=str(tmp_path / "a-file" / "out"), progress=False))


def test_output_dir_spellings():
    from fishkern.cli import build_parser

    parser = build_parser()
    for flag in ("--out-dir", "--output-dir", "--output_dir"):
        assert parser.parse_args(["glue", "sst2", flag, "somewhere"]).out_dir == "somewhere"


# ------------------------------------------------------------------------ one Fisher pass per N
def test_density_sweep_runs_the_fisher_pass_once_per_n(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    import torch
    from _tiny_bert import save_tiny_bert
    from torch.utils.data import DataLoader
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import fishkern.fisher
    import fishkern.fisher.mask
    import fishkern.finetune
    from fishkern import FishMask
    from fishkern.data import GlueCollator, tokenize_glue
    from fishkern.finetune import select_mask

    save_tiny_bert(tmp_path / "model")
    data = _sst2_data(tmp_path / "data")
    calls = []
    real = fishkern.fisher.estimate_fisher

    def counting(model, batches, num_samples, **kw):
        calls.append(num_samples)
        return real(model, batches, num_samples, **kw)

    # the runner's pass and the mask switch's (finetune's select_mask -> make_mask: where the old
    # code ran it, once per run)
    monkeypatch.setattr(fishkern.fisher, "estimate_fisher", counting)
    monkeypatch.setattr(fishkern.fisher.mask, "estimate_fisher", counting)
    densities, ns = (0.01, 0.03, 0.1), (4, 8)
    cfg = GlueConfig(task="sst2", model=str(tmp_path / "model"), data_dir=str(data), out_dir=str(tmp_path / "out"),
                     methods=("fish",), densities=densities, num_samples=ns, epochs=1, batch_size=4, progress=False)
    report = run_glue(cfg)
    assert sorted(calls) == [4, 8]  # one pass per N, not one per (density, N)
    rows = {r["run"]: r for r in report["runs"]}
    assert len(rows) == 6
    assert sum(not r["fisher_reused"] for r in rows.values()) == 2
    assert all(r["fisher_samples"] == r["num_samples_requested"] for r in rows.values())

    # each mask equals the one select_mask computes on its own for that (density, N)
    monkeypatch.setattr(fishkern.fisher.mask, "estimate_fisher", real)
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "model"))
    train = tokenize_glue(load_glue("sst2", data), tok, "sst2", 128)["train"].with_format("python")
    for n in ns:
        torch.manual_seed(cfg.seed)
        model = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "model"), num_labels=2)
        for d in densities:
            loader = DataLoader(train, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(cfg.seed + 1),
                                collate_fn=GlueCollator(tok.pad_token_id))
            separate, _ = select_mask(model, "fish", d, fisher_data=loader, num_samples=n, head=("classifier",),
                                      seed=cfg.seed, progress=False)
            saved = FishMask.load(tmp_path / "out" / "sst2" / f"fish_d{d:g}_n{n}" / "mask.safetensors")
            assert saved == separate, (d, n)
    assert "reused" in render_glue(report)


# ------------------------------------------------------------------------ report and plot
def _report(task="sst2", epochs=1, runs=None, chance=None):
    base = {"trainable": 10, "optimizer_state_bytes": 80, "step_ms": 1.0, "fisher_seconds": None}
    if runs is None:
        runs = [
            {**base, "run": "fish_d0.001_n8", "method": "fish", "density_requested": 0.001, "num_samples_requested": 8,
             "metrics": {"accuracy": 0.80}, "fisher_seconds": 1.5, "fisher_reused": False},
            {**base, "run": "fish_d0.005_n8", "method": "fish", "density_requested": 0.005, "num_samples_requested": 8,
             "metrics": {"accuracy": 0.85}, "fisher_seconds": 1.5, "fisher_reused": True},
            {**base, "run": "random_d0.001", "method": "random", "density_requested": 0.001, "num_samples_requested": None,
             "metrics": {"accuracy": 0.556}},
            {**base, "run": "random_d0.005", "method": "random", "density_requested": 0.005, "num_samples_requested": None,
             "metrics": {"accuracy": 0.60}},
            {**base, "run": "dense", "method": "dense", "density_requested": None, "num_samples_requested": None,
             "metrics": {"accuracy": 0.90}},
            {**base, "run": "bitfit", "method": "bitfit", "density_requested": None, "num_samples_requested": None,
             "metrics": {"accuracy": 0.88}},
        ]
    if chance is None:
        chance = {"class_id": 1, "class": "positive", "train_fraction": 0.55, "metrics": {"accuracy": 0.556}}
    return {"task": task, "device": "cpu", "batch_size": 16, "config": {"epochs": epochs, "lr": 5e-5},
            "chance": chance, "runs": runs}


def test_report_epoch_plural_and_chance_level():
    one = render_glue(_report(epochs=1))
    assert "1 epoch," in one and "1 epochs" not in one
    assert "7 epochs," in render_glue(_report(epochs=7))
    assert "chance level: always predicting 'positive'" in one and "accuracy=0.5560" in one
    flagged = [line for line in one.splitlines() if "≈ chance" in line]
    assert [line.split()[0] for line in flagged] == ["random_d0.001"]  # 0.556 = the majority rate; 0.60 is not
    assert "random_d0.001: accuracy within 0.01 of that level" in one


def test_chance_level_per_task():
    from fishkern.data import glue_task

    sst2 = chance_level(glue_task("sst2"), [1, 1, 0, 1], {"validation": [1, 0, 0, 1, 1]})
    assert sst2["class"] == "positive" and sst2["train_fraction"] == 0.75
    assert sst2["metrics"] == {"accuracy": pytest.approx(0.6)}
    cola = chance_level(glue_task("cola"), [1, 1, 0], {"validation": [1, 0, 1]})
    assert cola["metrics"] == {"matthews_correlation": 0.0}  # a constant answer has no correlation
    mrpc = chance_level(glue_task("mrpc"), [1, 1, 0], {"validation": [1, 0, 1, 1]})
    assert mrpc["metrics"]["accuracy"] == pytest.approx(0.75) and mrpc["metrics"]["f1"] == pytest.approx(6 / 7)
    mnli = chance_level(glue_task("mnli"), [2, 2, 0], {"validation_matched": [2, 1], "validation_mismatched": [0]})
    assert mnli["class"] == "contradiction"
    assert mnli["metrics"] == {"matched_accuracy": 0.5, "mismatched_accuracy": 0.0}
    assert chance_level(glue_task("stsb"), [0.5, 4.0], {"validation": [1.0]}) is None


def test_sweep_plot_percent_ticks_distinct_baselines_and_chance_line():
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    fig = glue_runner.glue_figure(_report())
    try:
        ax = fig.axes[0]
        fig.canvas.draw()
        labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
        assert labels == ["0.1%", "0.5%"]  # percentages, not 10⁻¹
        assert not [t.get_text() for t in ax.get_xticklabels(minor=True) if t.get_text()]
        lines = {line.get_label(): line for line in ax.get_lines()}
        dense, bitfit, chance = lines["dense"], lines["BitFit"], lines["chance (always 'positive')"]
        styles = {(line.get_linestyle(), line.get_color()) for line in (dense, bitfit, chance)}
        assert len(styles) == 3  # dense, BitFit and chance each in a style of their own
        assert chance.get_ydata()[0] == pytest.approx(0.556)
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert {"fish", "random", "dense", "BitFit", "chance (always 'positive')"} <= set(legend)
    finally:
        plt.close(fig)


def test_mnli_plot_uses_the_matched_accuracy(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    base = {"trainable": 10, "optimizer_state_bytes": 80, "step_ms": 1.0, "method": "fish", "density_requested": 0.005}
    runs = [{**base, "run": f"fish_d0.005_n{n}", "num_samples_requested": n,
             "metrics": {"matched_accuracy": a, "mismatched_accuracy": a - 0.01}} for n, a in ((16, 0.6), (64, 0.7))]
    chance = {"class_id": 0, "class": "entailment", "train_fraction": 0.4,
              "metrics": {"matched_accuracy": 0.35, "mismatched_accuracy": 0.36}}
    fig = glue_runner.glue_figure(_report("mnli", runs=runs, chance=chance))
    try:
        ax = fig.axes[0]
        fish = next(line for line in ax.get_lines() if line.get_label() == "fish")
        assert list(fish.get_ydata()) == [0.6, 0.7]
        fig.canvas.draw()
        assert [t.get_text() for t in ax.get_xticklabels() if t.get_text()] == ["16", "64"]
        assert ax.get_ylabel() == "mnli matched_accuracy"
    finally:
        plt.close(fig)
    glue_runner.plot_glue(_report("mnli", runs=runs, chance=chance), tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").stat().st_size > 0


def test_methods_match_finetune():
    from fishkern.finetune import METHODS

    assert glue_runner.METHODS == METHODS
