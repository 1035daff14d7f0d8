"""FishTrainer on a tiny BERT, run as one process or under torchrun / accelerate launch
(tests/distributed/test_ddp_hf.py). Writes OUT/rank{r}.pt with the final parameters, the mask and what was saved.

    python _hf_ddp_worker.py MODEL_DIR DATA_JSON OUT        # or: torchrun --nproc-per-node 2 _hf_ddp_worker.py ...

The global batch is 8 whatever the number of processes (per-device batch 8 / W), sampled
sequentially, so one process and W processes see the same samples in every step.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys

import torch

torch.set_num_threads(1)

import transformers  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainingArguments  # noqa: E402

from fishkern.integrations import FishTrainer  # noqa: E402

transformers.logging.set_verbosity_error()
GLOBAL_BATCH = 8


class Texts(torch.utils.data.Dataset):
    def __init__(self, tok, texts, labels):
        enc = tok(texts, padding="max_length", max_length=8, truncation=True, return_tensors="pt")
        self.items = [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
                       "labels": torch.tensor(labels[i])} for i in range(len(texts))]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def main() -> None:
    model_dir, data_json, out = sys.argv[1:4]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    data = json.load(open(data_json))
    tok = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer_cls, sequential = FishTrainer, {"train_sampling_strategy": "sequential"}
    if "train_sampling_strategy" not in {f.name for f in dataclasses.fields(TrainingArguments)}:  # transformers 4.x
        sequential = {}

        class SequentialFishTrainer(FishTrainer):
            def _get_train_sampler(self, *a, **k):
                return torch.utils.data.SequentialSampler(self.train_dataset)

        trainer_cls = SequentialFishTrainer
    args = TrainingArguments(
        output_dir=os.path.join(out, "trainer"), per_device_train_batch_size=GLOBAL_BATCH // world,
        num_train_epochs=2, learning_rate=float(os.environ.get("LR", "1e-3")), weight_decay=0.0, lr_scheduler_type="constant",
        **sequential, save_strategy="steps", save_steps=2, logging_strategy="no",
        report_to=[], use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0, max_grad_norm=1.0,
        # transformers multiplies the loss by the number of processes for models whose forward takes
        # **kwargs, expecting a loss normalised by the global token count; a classifier's mean loss is
        # not, so that would double the gradient with 2 processes (dense Trainer runs too)
        average_tokens_across_devices=False,
    )
    trainer = trainer_cls(model=model, args=args, train_dataset=Texts(tok, data["texts"], data["labels"]),
                          fish_density=0.02, fish_num_samples=16)
    trainer.train()
    written = trainer.save_task_file(os.path.join(out, "task.safetensors"), base)
    opt = trainer._masked_optimizer()
    torch.save({
        "world": world,
        "rank": rank,
        "final": {n: p.detach().clone() for n, p in model.named_parameters()},
        "mask": {n: i.clone() for n, i in trainer.fish_mask.indices.items()},
        "mask_digest": trainer.fish_mask.digest,
        "provenance": dict(trainer.fish_mask.provenance),
        "task_bytes": written,
        "comm": trainer.fish_comm_state.stats() if trainer.fish_comm_state is not None else None,
        "k": opt.num_masked(),
        "wrapped": type(trainer.model_wrapped).__name__,
    }, os.path.join(out, f"rank{rank}.pt"))


if __name__ == "__main__":
    main()
