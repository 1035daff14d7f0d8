"""FishTrainer's sparse checkpoints (issue 17, item 2) and its checks on the Trainer's hooks (item 9):
each checkpoint holds the k trained values, the mask and the k-sized optimizer state instead of a
dense model; training resumes from one bit-identically; save_total_limit / save_only_model /
load_best_model_at_end keep the Trainer's meaning; a resume onto another base is refused; a
transformers whose hooks FishTrainer does not find is an error, never a silent no-op."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from _tiny_bert import WORDS, save_tiny_bert

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from fishkern.diff import BaseMismatchError, CorruptFileError, SparseDiff  # noqa: E402
from fishkern.integrations import hf, load_task_file  # noqa: E402

transformers.logging.set_verbosity_error()
SPARSE_FILES = {"fish_model.safetensors", "fish_mask.safetensors", "trainer_state.json", "training_args.bin"}
RESUME_FILES = {"optimizer.pt", "scheduler.pt", "rng_state.pth"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


class Texts(torch.utils.data.Dataset):
    def __init__(self, tok, n=12):
        texts = [f"a {WORDS[i % 12]} film {i}" for i in range(n)]
        enc = tok(texts, padding="max_length", max_length=8, truncation=True, return_tensors="pt")
        self.items = [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
                       "labels": torch.tensor(i % 2)} for i in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class Record(transformers.TrainerCallback):
    """The losses logged by this run (not those read back from a checkpoint's trainer state) and the
    parameters at each save."""

    def __init__(self):
        self.losses, self.saved = {}, {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses[state.global_step] = (logs["loss"], logs.get("grad_norm"))

    def on_save(self, args, state, control, model=None, **kwargs):
        self.saved[state.global_step] = {n: p.detach().clone() for n, p in model.named_parameters()}


def fresh_model(model_dir, seed=0):
    torch.manual_seed(seed)  # dropout on: the RNG state saved with the checkpoint matters
    return transformers.AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=2, hidden_dropout_prob=0.1)


def make_trainer(model_dir, out, model=None, callbacks=(), trainer_kw=None, **kw):
    from fishkern.integrations import FishTrainer

    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    args = dict(output_dir=str(out), per_device_train_batch_size=4, num_train_epochs=2, learning_rate=1e-2,
                weight_decay=0.1, max_grad_norm=1.0, report_to=[], save_strategy="steps", save_steps=2,
                logging_steps=1, disable_tqdm=True, use_cpu=True, seed=0)
    fish = {k: kw.pop(k) for k in list(kw) if k.startswith("fish_")}
    args.update(kw)
    return FishTrainer(model=model if model is not None else fresh_model(model_dir), args=transformers.TrainingArguments(**args),
                       train_dataset=Texts(tok), callbacks=list(callbacks), fish_density=0.02, fish_num_samples=8, **fish,
                       **(trainer_kw or {}))


def unmasked_entry(mask, name="bert.embeddings.word_embeddings.weight"):
    taken = set(mask.indices[name].tolist()) if name in mask.indices else set()
    return name, next(i for i in range(torch.Size(mask.shapes[name]).numel()) if i not in taken)


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def uninterrupted(model_dir, tmp_path_factory):
    """6 steps (2 epochs of 3), a checkpoint every 2 steps."""
    out = tmp_path_factory.mktemp("run") / "out"
    rec = Record()
    t = make_trainer(model_dir, out, callbacks=[rec])
    t.train()
    return {"out": out, "final": params_of(t.model), "record": rec, "mask": t.fish_mask, "k": t.fish_mask.k}


def test_checkpoints_are_sparse(uninterrupted, model_dir):
    out = uninterrupted["out"]
    assert sorted(os.listdir(out)) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    dense = sum(p.numel() * p.element_size() for p in fresh_model(model_dir).parameters())
    for step in (2, 4, 6):
        c = out / f"checkpoint-{step}"
        assert set(os.listdir(c)) == SPARSE_FILES | RESUME_FILES  # no model.safetensors, config or tokenizer
        diff = SparseDiff.load(c / "fish_model.safetensors", mask=uninterrupted["mask"])
        assert diff.k == uninterrupted["k"] and diff.step == step
        assert (c / "fish_model.safetensors").stat().st_size < 0.1 * dense
        # the file is a task file: onto a fresh copy of the pretrained model (another random head),
        # the parameters of that step exactly
        m = fresh_model(model_dir, seed=123)
        load_task_file(c / "fish_model.safetensors", m)
        for n, p in m.named_parameters():
            assert torch.equal(p, uninterrupted["record"].saved[step][n]), (step, n)


def test_resume_from_the_middle_checkpoint_is_bit_identical(uninterrupted, model_dir, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(uninterrupted["out"], out)
    shutil.rmtree(out / "checkpoint-6")
    rec = Record()
    t = make_trainer(model_dir, out, callbacks=[rec])
    t.train(resume_from_checkpoint=str(out / "checkpoint-4"))
    assert t.fish_mask == uninterrupted["mask"] and t.state.global_step == 6
    assert sorted(rec.losses) == [5, 6]
    for step in (5, 6):  # losses and gradient norms of the resumed steps, exactly
        assert rec.losses[step] == uninterrupted["record"].losses[step], step
    for n, p in t.model.named_parameters():
        assert torch.equal(p, uninterrupted["final"][n]), n
    # the resumed run's own checkpoint is sparse too, against the same base
    diff = SparseDiff.load(out / "checkpoint-6" / "fish_model.safetensors")
    first = SparseDiff.load(uninterrupted["out"] / "checkpoint-6" / "fish_model.safetensors")
    assert diff.base == first.base and diff.tuned == first.tuned


def test_resume_onto_another_base_or_a_damaged_file_is_refused(uninterrupted, model_dir, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(uninterrupted["out"], out)
    other = fresh_model(model_dir)
    mask = uninterrupted["mask"]
    name, free = unmasked_entry(mask)
    with torch.no_grad():  # one entry the mask does not train: another pretrained model
        other.get_parameter(name).view(-1)[free] += 1e-3
    before = params_of(other)
    t = make_trainer(model_dir, out, model=other)
    with pytest.raises(BaseMismatchError, match="checkpoint-4.*another"):
        t.train(resume_from_checkpoint=str(out / "checkpoint-4"))
    for n, p in other.named_parameters():
        assert torch.equal(p, before[n]), n  # nothing changed, the head included
    f = out / "checkpoint-4" / "fish_model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-10] ^= 0xFF
    f.write_bytes(bytes(raw))
    t = make_trainer(model_dir, out)
    with pytest.raises(CorruptFileError):
        t.train(resume_from_checkpoint=str(out / "checkpoint-4"))


def test_save_total_limit_rotates_and_save_only_model_skips_the_state(model_dir, tmp_path):
    rec = Record()
    t = make_trainer(model_dir, tmp_path / "out", callbacks=[rec], save_total_limit=2, save_only_model=True)
    t.train()
    out = tmp_path / "out"
    assert sorted(os.listdir(out)) == ["checkpoint-4", "checkpoint-6"]  # checkpoint-2 deleted whole
    for step in (4, 6):
        assert set(os.listdir(out / f"checkpoint-{step}")) == SPARSE_FILES
        m = fresh_model(model_dir)
        load_task_file(out / f"checkpoint-{step}" / "fish_model.safetensors", m)
        for n, p in m.named_parameters():
            assert torch.equal(p, rec.saved[step][n]), (step, n)


def test_load_best_model_at_end(model_dir, tmp_path):
    calls = []

    def metric(_):  # the first evaluation is the best one: the best checkpoint is not the last
        calls.append(1)
        return {"score": 1.0 if len(calls) == 1 else 0.0}

    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    rec = Record()
    t = make_trainer(model_dir, tmp_path / "out", callbacks=[rec], eval_strategy="steps", eval_steps=2,
                     load_best_model_at_end=True, metric_for_best_model="score", greater_is_better=True, save_total_limit=1,
                     trainer_kw=dict(eval_dataset=Texts(tok, n=4), compute_metrics=metric))
    t.train()
    assert t.state.best_model_checkpoint.endswith("checkpoint-2")
    changed = False
    for n, p in t.model.named_parameters():
        assert torch.equal(p, rec.saved[2][n]), n
        changed |= not torch.equal(p, rec.saved[6][n])
    assert changed
    assert (tmp_path / "out" / "checkpoint-2" / "fish_model.safetensors").is_file()  # rotation keeps the best


def test_dense_checkpoints_on_request(model_dir, tmp_path):
    t = make_trainer(model_dir, tmp_path / "out", fish_sparse_checkpoints=False, max_steps=2)
    t.train()
    files = set(os.listdir(tmp_path / "out" / "checkpoint-2"))
    assert {"model.safetensors", "fish_mask.safetensors"} <= files and "fish_model.safetensors" not in files
    final = params_of(t.model)
    t2 = make_trainer(model_dir, tmp_path / "out", max_steps=2)
    t2.train(resume_from_checkpoint=True)  # the Trainer's own loader
    for n, p in t2.model.named_parameters():
        assert torch.equal(p, final[n]), n


@pytest.mark.parametrize("what", ["parameter", "buffer"])
def test_a_change_a_sparse_checkpoint_cannot_hold_is_an_error(model_dir, tmp_path, what):
    class Tamper(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step != 1:
                return
            with torch.no_grad():
                if what == "parameter":  # an entry the mask does not train
                    name, free = unmasked_entry(t.fish_mask)
                    model.get_parameter(name).view(-1)[free] += 1.0
                else:
                    model.bert.embeddings.token_type_ids.add_(1)

    t = make_trainer(model_dir, tmp_path / "out", callbacks=[Tamper()], max_steps=2)
    with pytest.raises(RuntimeError, match="outside the FISH mask" if what == "parameter" else "buffers"):
        t.train()


# ------------------------------------------------------------------------------ the Trainer's hooks
def test_missing_trainer_hooks_are_named():
    hf.check_trainer_hooks(transformers.Trainer, transformers.TrainerCallback)  # the installed one has them
    members = {name: getattr(transformers.Trainer, name) for name, _ in hf.TRAINER_HOOKS}

    def without(name):
        return type("OldTrainer", (), {k: v for k, v in members.items() if k != name})

    for name, _ in hf.TRAINER_HOOKS:
        with pytest.raises(ImportError, match=rf"Trainer\.{name}\(.*transformers 9\.9 does not have"):
            hf.check_trainer_hooks(without(name), version="9.9")
    changed = dict(members, _load_from_checkpoint=lambda self, checkpoint: None)  # a renamed parameter
    with pytest.raises(ImportError, match="parameter 'resume_from_checkpoint', which Trainer._load_from_checkpoint"):
        hf.check_trainer_hooks(type("T", (), changed), version="9.9")
    with pytest.raises(ImportError, match="on_pre_optimizer_step"):
        hf.check_trainer_hooks(transformers.Trainer, type("C", (), {"on_train_begin": lambda s: None}), version="9.9")


def test_clipping_the_trainer_does_not_route_is_an_error(model_dir, tmp_path, monkeypatch):
    # as if the Trainer clipped some other way: the trained entries would not be clipped
    monkeypatch.setattr(hf._FishTrainerMixin, "_route_clipping", lambda self: None)
    t = make_trainer(model_dir, tmp_path / "out", max_steps=1, save_strategy="no")
    with pytest.raises(RuntimeError, match="did not clip"):
        t.train()
    t = make_trainer(model_dir, tmp_path / "out2", max_steps=1, save_strategy="no", max_grad_norm=0.0)
    t.train()  # no clipping asked for: nothing to check


def test_a_checkpoint_saved_around_save_model_is_an_error(model_dir, tmp_path):
    t = make_trainer(model_dir, tmp_path / "out", max_steps=2)
    # as if _save_checkpoint wrote the model some other way (the folder is made, the model is not in it)
    t.save_model = lambda output_dir=None, *a, **k: os.makedirs(output_dir, exist_ok=True)
    with pytest.raises(RuntimeError, match="without calling"):
        t.train()


def test_a_resume_or_best_model_load_around_the_hooks_is_an_error(uninterrupted, model_dir, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(uninterrupted["out"], out)
    t = make_trainer(model_dir, out)
    t._load_from_checkpoint = lambda *a, **k: None  # as if the Trainer loaded the checkpoint another way
    with pytest.raises(RuntimeError, match="_load_from_checkpoint"):
        t.train(resume_from_checkpoint=str(out / "checkpoint-4"))
    cb = next(c for c in t.callback_handler.callbacks if type(c).__name__ == "FishTrainerCallback")
    t.args.load_best_model_at_end = True
    t.state.best_model_checkpoint = str(out / "checkpoint-2")  # and the Trainer never called _load_best_model
    with pytest.raises(RuntimeError, match="_load_best_model"):
        cb.on_train_end(t.args, t.state, t.control)
