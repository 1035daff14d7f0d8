"""The whole FISH-mask data path on one device against the CPU: stage 03 of scripts/gpu_check.sh.

    python scripts/gpu_smoke.py --device cuda     GPU against CPU
    python scripts/gpu_smoke.py --device cpu      CPU against CPU (the dry run: same code, no GPU)

For a tiny BERT (transformers' BertForSequenceClassification, random init, no dropout) and a small
CIFAR ResNet (fishkern.models.cifar_resnet, BatchNorm): Fisher scores (fishkern.estimate_fisher,
implementation "auto": the Triton kernel for the sequence Linears on CUDA), the mask
(fishkern.fisher_mask, and fishkern.global_topk against fishkern.topk.global_topk_reference on the
same scores), N steps of MaskedAdamW (BERT) / MaskedSGD (ResNet) with implementation "auto"
(Triton on CUDA) and "torch", and a SparseDiff saved from the device model, loaded and applied to a
CPU copy of the base. Both devices train with the CPU's mask, so a near-tie that ranks differently
on the GPU does not make every later comparison meaningless (it is reported by its own check).

Tolerances, all fp32 with TF32 off: Fisher scores |a - b| <= 1e-4 x max|b| per tensor (squared
gradients summed in another order), max|b| taken as at least 1e-6 x the model's largest score
(tensors whose true Fisher is zero hold only rounding noise, see max_scaled_error); parameters
after N steps |a - b| <= 1e-4 + 1e-4 |b| (AdamW normalises updates, so a gradient that differs by rounding moves its entry by about lr x its
relative error); "auto" against "torch" on the same device 1e-5; masks identical except entries
within 1e-4 (relative) of the k-th score; what must be exact (global_topk on identical scores,
untrained entries, the diff round trip) is compared bitwise.
Prints a PASS / FAIL / SKIP table; exit status 1 on any FAIL.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import fishkern  # noqa: E402
from fishkern.models import cifar_resnet  # noqa: E402
from fishkern.topk import global_topk_reference  # noqa: E402

SCORE_RTOL = 1e-4
NOISE_FLOOR = 1e-6  # of the largest score: smaller per-tensor maxima count as rounding noise
PARAM_ATOL, PARAM_RTOL = 1e-4, 1e-4
SAME_DEVICE_TOL = 1e-5
TIE_RTOL = 1e-4
DENSITY = 0.02
STEPS = 4

ROWS: list[tuple[str, str, str, str]] = []  # (check, status, measured, tolerance)


def record(check: str, ok: bool | None, measured: str = "", tol: str = "") -> None:
    status = "SKIP" if ok is None else ("PASS" if ok else "FAIL")
    ROWS.append((check, status, measured, tol))
    print(f"  {status:4} {check}: {measured}" + (f" (tol {tol})" if tol else ""), flush=True)


# ------------------------------------------------------------------------------------ comparisons

def max_scaled_error(got: dict, ref: dict, floor: float = None) -> tuple[float, str]:
    """(worst, its tensor's name): max over tensors of max|got - ref| / max(max|ref|, floor x M), M the
    largest |ref| over all tensors (0 where everything is zero and got equals it).

    The floor keeps tensors whose true Fisher is zero from dominating: in BERT, attention key biases
    have a mathematically zero gradient (a constant added to every key's score for one query cancels
    in the softmax), so their scores are squared rounding noise (~1e-24 against ~1e-2 elsewhere) that
    differs by 20-80% between two correct devices, or two summation orders on one device."""
    floor = NOISE_FLOOR if floor is None else floor
    top = max((r.detach().abs().max().item() for r in ref.values() if r.numel()), default=0.0)
    worst, where = 0.0, ""
    for name, r in ref.items():
        g = got[name].detach().to("cpu", torch.float64)
        r = r.detach().to("cpu", torch.float64)
        err = (g - r).abs().max().item() if r.numel() else 0.0
        scale = max(r.abs().max().item() if r.numel() else 0.0, floor * top)
        e = err / scale if scale > 0 else (0.0 if err == 0 else float("inf"))
        if e > worst or not where:
            worst, where = e, name
    return worst, where


def close_error(got: list, ref: list, atol: float, rtol: float) -> tuple[float, int]:
    """(max |got - ref|, number of entries outside atol + rtol |ref|)."""
    worst, bad = 0.0, 0
    for g, r in zip(got, ref):
        g = g.detach().to("cpu", torch.float64)
        r = r.detach().to("cpu", torch.float64)
        d = (g - r).abs()
        if d.numel():
            worst = max(worst, d.max().item())
            bad += int((d > atol + rtol * r.abs()).sum())
    return worst, bad


def selection_differences(scores: list, a: list, b: list, k: int, rel_tol: float) -> tuple[int, int]:
    """(entries selected by exactly one of a and b, how many of those are not within rel_tol of the
    k-th largest score). A correct pair of selections has the second number 0."""
    flat = torch.cat([s.detach().reshape(-1).to("cpu", torch.float64) for s in scores])
    kth = torch.topk(flat, k).values[-1].item() if k else 0.0
    offsets = torch.tensor([0] + [s.numel() for s in scores], dtype=torch.int64).cumsum(0)
    ga = torch.cat([i.cpu().long() + offsets[j] for j, i in enumerate(a)])
    gb = torch.cat([i.cpu().long() + offsets[j] for j, i in enumerate(b)])
    sym = torch.from_numpy(__import__("numpy").setxor1d(ga.numpy(), gb.numpy())).long()
    if sym.numel() == 0:
        return 0, 0
    far = (flat[sym] - kth).abs() > rel_tol * abs(kth)
    return int(sym.numel()), int(far.sum())


# ----------------------------------------------------------------------------------- the two models

def tiny_bert():
    import transformers

    cfg = transformers.BertConfig(
        vocab_size=211, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3,
    )
    cfg._attn_implementation = "eager"  # the same attention arithmetic on both devices
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(cfg)


def bert_batches(n_batches: int = 4, batch: int = 4, seq: int = 12) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(1, 211, (batch, seq), generator=g)
        lengths = torch.randint(3, seq + 1, (batch,), generator=g)
        att = (torch.arange(seq)[None, :] < lengths[:, None]).long()
        out.append({"input_ids": ids * att, "attention_mask": att, "labels": torch.randint(0, 3, (batch,), generator=g)})
    return out


def small_resnet():
    torch.manual_seed(0)
    return cifar_resnet(blocks=(1, 1, 1, 1), widths=(8, 16, 32, 64), num_classes=10)


def resnet_batches(n_batches: int = 3, batch: int = 4) -> list[tuple]:
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(batch, 3, 16, 16, generator=g), torch.randint(0, 10, (batch,), generator=g)) for _ in range(n_batches)]


def to_device(batch, device):
    if isinstance(batch, dict):
        return {k: v.to(device) for k, v in batch.items()}
    return tuple(t.to(device) for t in batch)


def loss_of(model, batch):
    if isinstance(batch, dict):
        return model(**batch).loss
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


# ------------------------------------------------------------------------------------ one pipeline

def fisher_and_mask(model, data, n_samples, reference: bool):
    """(estimate_fisher's result, the mask). The device side builds its mask with fisher_mask (a
    second Fisher pass, the one-call user path); the CPU reference ranks its scores once with
    FishMask.from_scores, which is what fisher_mask does after its pass."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = fishkern.estimate_fisher(model, data, n_samples, progress=False)
        if reference:
            mask = fishkern.FishMask.from_scores({n: res.scores[n].float() for n, _ in model.named_parameters()}, DENSITY)
        else:
            mask = fishkern.fisher_mask(model, data, DENSITY, n_samples, progress=False)
    for w in caught:
        print(f"    warning: {w.message}")
    return res, mask


def train(model, mask, data, family: str, implementation: str):
    """STEPS optimizer steps over the batches (cycled); returns (losses, parameters after)."""
    params = list(model.parameters())
    idx = mask.mask_indices(model)
    if family == "adamw":
        opt = fishkern.MaskedAdamW(params, idx, lr=1e-3, weight_decay=0.01, implementation=implementation)
    else:
        opt = fishkern.MaskedSGD(params, idx, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4,
                                 implementation=implementation)
    model.train()
    losses = []
    for step in range(STEPS):
        opt.zero_grad()
        loss = loss_of(model, data[step % len(data)])
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return losses, [p.detach().clone() for p in params]


def untrained_unchanged(before: list, after: list, idx: list) -> bool:
    for b, a, i in zip(before, after, idx):
        keep = torch.ones(b.numel(), dtype=torch.bool, device=b.device)
        keep[i.to(b.device)] = False
        if not torch.equal(b.reshape(-1)[keep], a.reshape(-1)[keep]):
            return False
    return True


def check_model(label: str, build, batches, n_samples: int, family: str, device: torch.device, work: Path) -> None:
    print(f"== {label} on {device} against cpu", flush=True)
    base = build()
    ref_model, dev_model = copy.deepcopy(base), copy.deepcopy(base).to(device)
    cpu_data = [to_device(b, "cpu") for b in batches]
    dev_data = [to_device(b, device) for b in batches]
    t0 = time.perf_counter()

    # Fisher and mask
    ref_res, ref_mask = fisher_and_mask(ref_model, cpu_data, n_samples, reference=True)
    dev_res, dev_mask = fisher_and_mask(dev_model, dev_data, n_samples, reference=False)
    want = "triton" if device.type == "cuda" and label == "bert" else None
    record(f"{label} fisher implementation", dev_res.implementation == want if want else dev_res.implementation != "loop",
           f"{dev_res.implementation} (cpu: {ref_res.implementation})", f"{want or 'batched'}")
    err, where = max_scaled_error(dev_res.scores, ref_res.scores)
    record(f"{label} fisher scores vs cpu", err <= SCORE_RTOL, f"max err / max score {err:.2e} ({where})",
           f"{SCORE_RTOL:g}, per tensor, scores under {NOISE_FLOOR:g} x the largest count as noise")

    names = [n for n, _ in dev_model.named_parameters()]
    dev_scores = [dev_res.scores[n] for n in names]
    k = int(DENSITY * sum(s.numel() for s in dev_scores))
    got = fishkern.global_topk(dev_scores, k)
    exact = global_topk_reference(dev_scores, k)
    same = all(torch.equal(g.cpu(), e.cpu()) for g, e in zip(got, exact))
    record(f"{label} global_topk vs reference (same scores)", same, f"k={k:,}, {'identical' if same else 'DIFFERENT'}", "exact")

    ref_scores = [ref_res.scores[n] for n in names]
    ref_idx = [ref_mask.indices.get(n, torch.empty(0, dtype=torch.int64)) for n in names]
    dev_idx = [dev_mask.indices.get(n, torch.empty(0, dtype=torch.int64)) for n in names]
    n_diff, n_far = selection_differences(ref_scores, ref_idx, dev_idx, ref_mask.k, TIE_RTOL)
    record(f"{label} fisher_mask vs cpu", n_far == 0 and dev_mask.k == ref_mask.k,
           f"k={dev_mask.k:,}/{ref_mask.k:,}, {n_diff} differ, {n_far} not near-ties", f"near-ties {TIE_RTOL:g}")

    # training with the CPU's mask on both devices
    start_dev = [p.detach().clone() for p in dev_model.parameters()]
    base_dev = copy.deepcopy(dev_model)
    mask_dev = ref_mask.to(device)
    ref_losses, ref_params = train(copy.deepcopy(ref_model), ref_mask, cpu_data, family, "auto")
    torch_losses, torch_params = train(copy.deepcopy(dev_model), mask_dev, dev_data, family, "torch")
    tuned = dev_model  # trained in place with "auto": the model the diff is made from
    auto_losses, auto_params = train(tuned, mask_dev, dev_data, family, "auto")
    opt_name = "MaskedAdamW" if family == "adamw" else "MaskedSGD"
    for impl, params, losses in (("auto", auto_params, auto_losses), ("torch", torch_params, torch_losses)):
        worst, bad = close_error(params, ref_params, PARAM_ATOL, PARAM_RTOL)
        record(f"{label} {opt_name} {impl}: parameters after {STEPS} steps vs cpu", bad == 0,
               f"max |diff| {worst:.2e}, {bad} outside; losses {losses[0]:.4f}..{losses[-1]:.4f} "
               f"(cpu {ref_losses[0]:.4f}..{ref_losses[-1]:.4f})", f"{PARAM_ATOL:g} + {PARAM_RTOL:g}|x|")
    worst, bad = close_error(auto_params, torch_params, SAME_DEVICE_TOL, SAME_DEVICE_TOL)
    record(f"{label} {opt_name} auto vs torch on {device.type}", bad == 0, f"max |diff| {worst:.2e}", f"{SAME_DEVICE_TOL:g}")
    idx_dev = mask_dev.mask_indices(tuned)
    record(f"{label} {opt_name} untrained entries unchanged", untrained_unchanged(start_dev, auto_params, idx_dev),
           "bitwise", "exact")

    # sparse diff: made on the device, saved, loaded, applied to a CPU copy of the base
    diff = fishkern.SparseDiff.from_models(base_dev, tuned, mask_dev)
    path = work / f"{label}_{device.type}.fkdiff"
    path.unlink(missing_ok=True)
    nbytes = diff.save(path)
    loaded = fishkern.SparseDiff.load(path, mask=ref_mask)
    target = copy.deepcopy(base)
    loaded.apply_(target)
    tuned_cpu = {n: p.detach().cpu() for n, p in tuned.named_parameters()}
    exact_apply = all(torch.equal(p.detach(), tuned_cpu[n]) for n, p in target.named_parameters())
    loaded.revert_(target)
    exact_revert = all(torch.equal(p.detach(), b.detach()) for p, b in zip(target.parameters(), base.parameters()))
    record(f"{label} SparseDiff save/load/apply_/revert_ ({device.type} -> cpu)", exact_apply and exact_revert,
           f"{nbytes:,} bytes, k={loaded.k:,}, apply {'exact' if exact_apply else 'DIFFERENT'}, "
           f"revert {'exact' if exact_revert else 'DIFFERENT'}", "exact")
    print(f"   ({label}: {time.perf_counter() - t0:.1f} s)", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="the device to check against the CPU (cpu: the dry run)")
    ap.add_argument("--work", default=None, help="directory for the diff files (default: a temporary one)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_smoke: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 1
    # the same fp32 arithmetic on both sides: no TF32 in matmuls or convolutions
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu_smoke_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"gpu_smoke: {device} against cpu; torch {torch.__version__}; fishkern {fishkern.__version__}; "
          f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r}", flush=True)

    try:
        import transformers  # noqa: F401
        have_transformers = True
    except ImportError:
        have_transformers = False
    for label, build, batches, n, family in (
        ("bert", tiny_bert, bert_batches, 16, "adamw"),
        ("resnet", small_resnet, resnet_batches, 12, "sgd"),
    ):
        if label == "bert" and not have_transformers:
            record("bert (all checks)", None, "transformers is not installed")
            continue
        try:
            check_model(label, build, batches(), n, family, device, work)
        except Exception as e:  # one broken model must not hide the other's results
            import traceback

            traceback.print_exc()
            record(f"{label} pipeline", False, f"{type(e).__name__}: {e}")

    width = max(len(r[0]) for r in ROWS)
    print("\n" + f"{'check':{width}}  result  measured  (tolerance)")
    for check, status, measured, tol in ROWS:
        print(f"{check:{width}}  {status:6}  {measured}" + (f"  ({tol})" if tol else ""))
    n_fail = sum(r[1] == "FAIL" for r in ROWS)
    print(f"\ngpu_smoke: {len(ROWS) - n_fail} of {len(ROWS)} checks did not fail; {'FAIL' if n_fail else 'PASS'}")
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
