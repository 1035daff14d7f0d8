"""FISH fine-tuning of decoder LMs: a hand-written loop (fp32, and bf16 with fp32 master copies),
FishTrainer on an SFT-style dataset, any Trainer subclass through fish_trainer_class (TRL's
SFTTrainer where TRL is installed), and task files of tied weights (stored once, both uses restored)."""
from __future__ import annotations

import pytest
import torch

import fishkern
from fishkern.diff import SparseDiff
from fishkern.integrations import fish_mask_for, fish_trainer_class, load_task_file, save_task_file
from tests._tiny_lms import VOCAB, lm_batches, tiny_lm

pytest.importorskip("transformers")


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_only_masked_entries_moved(model, before, mask):
    moved = 0
    for n, p in model.named_parameters():
        inside = torch.zeros(p.numel(), dtype=torch.bool)
        if n in mask.indices:
            inside[mask.indices[n].long()] = True
        changed = (p.detach().reshape(-1) != before[n].reshape(-1))
        assert not (changed & ~inside).any(), f"{n}: an entry outside the mask moved"
        moved += int(changed.sum())
    assert moved > 0.5 * mask.k, f"only {moved} of {mask.k} masked entries moved"


def train_loop(model, mask, batches, steps=3, **opt_kw):
    opt = fishkern.MaskedAdamW(model.named_parameters(), mask, lr=1e-2, weight_decay=0.0, **opt_kw)
    model.train()
    for step in range(steps):
        loss = model(**batches[step % len(batches)]).loss
        loss.backward()
        opt.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad()
    model.eval()
    return opt


def logits_of(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("family", ["llama_tied", "gpt2_tied", "mistral"])
def test_fish_loop_trains_only_the_mask_and_the_task_file_round_trips(family, tmp_path):
    model = tiny_lm(family, dtype=torch.float32)
    base = snapshot(model)
    batches = lm_batches(n_batches=3)
    mask = fish_mask_for(model, batches, density=0.005, num_samples=12, progress=False)
    total = sum(p.numel() for p in model.parameters())
    assert tuple(mask.forced) == () and mask.k == int(0.005 * total)
    train_loop(model, mask, batches, free_dense_grads=True)
    assert_only_masked_entries_moved(model, base, mask)

    path = tmp_path / "task.safetensors"
    save_task_file(model, base, mask, path)
    fresh = tiny_lm(family, dtype=torch.float32)
    load_task_file(path, fresh)
    assert torch.equal(logits_of(fresh, batches[0]), logits_of(model, batches[0]))
    if family.endswith("_tied"):
        emb, head = fresh.get_input_embeddings().weight, fresh.get_output_embeddings().weight
        assert emb is head  # still one tensor: both uses restored by one entry
        stored = SparseDiff.load(path)
        assert "lm_head.weight" not in stored.shapes  # the tied weight is stored once, by its first name
        assert "lm_head.weight" not in stored.indices


def test_bf16_parameters_train_through_fp32_master_copies():
    model = tiny_lm("qwen2_tied", dtype=torch.bfloat16)
    base = snapshot(model)
    batches = lm_batches(n_batches=2)
    mask = fish_mask_for(model, batches, density=0.005, num_samples=8, progress=False)
    opt = train_loop(model, mask, batches, steps=4, master_weights=True)
    assert_only_masked_entries_moved(model, base, mask)
    params = [p for _, p in model.named_parameters()]
    names = [n for n, _ in model.named_parameters()]
    state = opt.state_dict()["state"]
    assert state, "no optimizer state"
    for i, entry in state.items():  # each trained tensor: its k entries are the fp32 masters, rounded
        p, n = params[i], names[i]
        assert p.dtype == torch.bfloat16 and entry["master"].dtype == torch.float32, n
        idx = mask.indices[n].long()
        assert torch.equal(p.detach().reshape(-1)[idx], entry["master"].to(torch.bfloat16)), n
    # and the masters hold what bf16 cannot: some moved by less than the parameter's rounding shows
    assert any(not torch.equal(e["master"], e["master"].to(torch.bfloat16).float()) for e in state.values())


# ------------------------------------------------------------------------------------- Trainer
class SFTRows(torch.utils.data.Dataset):
    """An SFT-style dataset: prompt + answer token rows of varying length, prompt labels -100."""

    def __init__(self, n=24, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.rows = []
        for _ in range(n):
            prompt, answer = int(torch.randint(2, 5, (1,), generator=g)), int(torch.randint(3, 7, (1,), generator=g))
            ids = torch.randint(1, VOCAB, (prompt + answer,), generator=g)
            labels = ids.clone()
            labels[:prompt] = -100
            self.rows.append({"input_ids": ids, "labels": labels})

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def pad_collator(rows):
    T = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    labels = torch.full((len(rows), T), -100)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = r["input_ids"], r["labels"], 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def training_args(tmp_path, **kw):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
        weight_decay=0.0, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
        logging_strategy="no", **kw,
    )


def test_fish_trainer_fine_tunes_a_causal_lm(tmp_path):
    from fishkern.integrations import FishTrainer

    model = tiny_lm("llama_tied", dtype=torch.float32)
    base = snapshot(model)
    trainer = FishTrainer(model=model, args=training_args(tmp_path), train_dataset=SFTRows(), data_collator=pad_collator,
                          fish_density=0.005, fish_num_samples=16)
    trainer.train()
    mask = trainer.fish_mask
    assert tuple(mask.forced) == () and mask.k == int(0.005 * sum(p.numel() for p in model.parameters()))
    assert_only_masked_entries_moved(model, base, mask)
    path = tmp_path / "task.safetensors"
    trainer.save_task_file(path, base=base)
    fresh = tiny_lm("llama_tied", dtype=torch.float32)
    load_task_file(path, fresh)
    batch = pad_collator([SFTRows()[i] for i in range(4)])
    assert torch.equal(logits_of(fresh, batch), logits_of(model.eval(), batch))


def test_any_trainer_subclass_gets_the_fish_version(tmp_path):
    """A Trainer subclass with its own compute_loss (as TRL's SFTTrainer has): its loss trains the mask."""
    from transformers import Trainer

    calls = []

    class MyTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, **kw):
            calls.append(1)
            return super().compute_loss(model, inputs, return_outputs=return_outputs, **kw)

    cls = fish_trainer_class(MyTrainer)
    assert cls is fish_trainer_class(MyTrainer) and issubclass(cls, MyTrainer) and cls.__name__ == "FishMyTrainer"
    model = tiny_lm("gpt2_tied", dtype=torch.float32)
    base = snapshot(model)
    trainer = cls(model=model, args=training_args(tmp_path), train_dataset=SFTRows(), data_collator=pad_collator,
                  fish_density=0.005, fish_num_samples=8)
    trainer.train()
    assert len(calls) == 3
    assert isinstance(trainer.optimizer, fishkern.MaskedAdamW) or isinstance(
        getattr(trainer.optimizer, "optimizer", None), fishkern.MaskedAdamW)
    assert_only_masked_entries_moved(model, base, trainer.fish_mask)
    with pytest.raises(TypeError, match="subclass of transformers.Trainer"):
        fish_trainer_class(dict)
    with pytest.raises(TypeError, match="already trains a FISH mask"):
        fish_trainer_class(cls)


def test_trl_sft_trainer(tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(VOCAB - 2)]
    vocab = {"<pad>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>")
    g = torch.Generator().manual_seed(0)
    rows = [{"prompt": " ".join(words[j] for j in torch.randint(0, len(words), (3,), generator=g).tolist()),
             "completion": " " + " ".join(words[j] for j in torch.randint(0, len(words), (4,), generator=g).tolist())}
            for _ in range(16)]
    model = tiny_lm("qwen2_tied", dtype=torch.float32)
    model.config.pad_token_id, model.config.eos_token_id = 0, 1
    base = snapshot(model)
    FishSFTTrainer = fish_trainer_class(trl.SFTTrainer)
    args = trl.SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                         weight_decay=0.0, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
                         logging_strategy="no", max_length=16)
    trainer = FishSFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                             fish_density=0.005, fish_num_samples=8)
    trainer.train()
    assert tuple(trainer.fish_mask.forced) == ()
    assert_only_masked_entries_moved(model, base, trainer.fish_mask)
