"""The ``fishkern cifar`` subcommand: its options and what it runs. Builds its parser without torch."""
from __future__ import annotations

import sys

from ..args import add_out_dir, fraction, non_negative_int, positive_float, positive_int
from . import benchmark, miniature, run
from .config import DATASETS, METHODS, CifarConfig
from .report import render_runs


def add_parser(sub, add_common) -> None:
    """The ``fishkern cifar`` subcommand (called by ``fishkern.cli.build_parser``)."""
    import argparse

    d = CifarConfig()
    p = sub.add_parser(
        "cifar",
        help="the paper's ResNet-34 / CIFAR-10 distributed and checkpointing recipe (Figure 3, Table 4); --miniature: offline",
        description="Train a CIFAR ResNet (ResNet-34 by default) from scratch: standard (1 process, dense), dense "
        "distributed, FISH or random masks on M real torch.distributed workers (torchrun, or --workers M spawned here) "
        "exchanging k values every H local steps; optional mask recomputation and sparse per-epoch checkpoints. "
        "Defaults are the paper's (batch 512, Nesterov SGD 0.9, wd 5e-4, 5-epoch warm-ups, 100 epochs, N=256). "
        "--miniature runs the offline miniature on scikit-learn's digits (report.md, results.json, PNGs); "
        "--benchmark-steps N times standard vs FISH training steps (for a GPU: --device cuda). "
        "Needs: pip install 'fishkern[cifar]'. Under torchrun: "
        "torchrun --standalone --nproc-per-node G -m fishkern cifar ... (one process per GPU).",
    )
    p.add_argument("--miniature", action="store_true", help="the offline miniature of Figure 3 and Table 4 on 8x8 digits "
                   "(2 gloo workers, a few minutes on a CPU); uses its own recipe (only --out-dir, --seeds, --workers, "
                   "--threads, --overwrite, --no-progress apply)")
    p.add_argument("--benchmark-steps", type=positive_int, default=0, metavar="N",
                   help="time N training steps of standard vs --methods masks at --density (no training run)")
    p.add_argument("--dataset", choices=DATASETS, default=d.dataset, help="default: %(default)s")
    p.add_argument("--data-dir", default=None, help="local CIFAR-10: a saved DatasetDict directory (train/test, columns "
                   "img/image + label) or an .npz file (x_train, y_train, x_test, y_test) (default: download uoft-cs/cifar10)")
    add_out_dir(p, d.out_dir)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(d.methods), help="default: fish")
    p.add_argument("--density", type=fraction, nargs="+", default=list(d.densities),
                   help="mask densities as fractions (default: 0.1; the paper: 0.005 0.02 0.1)")
    p.add_argument("--merge-interval", type=positive_int, nargs="+", default=list(d.merge_intervals), metavar="H",
                   help="local steps between exchanges (default: 100; the paper: 100 500 2500)")
    p.add_argument("--workers", type=positive_int, default=None, metavar="M",
                   help="spawn M local worker processes (default 2; under torchrun: its processes)")
    p.add_argument("--epochs", type=positive_int, default=d.epochs, help="total epochs, warm-up included (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="per worker (default: %(default)s)")
    p.add_argument("--lr", type=positive_float, default=d.lr, help="peak learning rate (default: %(default)s)")
    p.add_argument("--lr-warmup-epochs", type=float, default=d.lr_warmup_epochs, help="default: %(default)s")
    p.add_argument("--momentum", type=float, default=d.momentum, help="default: %(default)s")
    p.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=d.nesterov, help="default: on")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="on the trained entries (default: %(default)s)")
    p.add_argument("--dense-warmup-epochs", type=non_negative_int, default=d.dense_warmup_epochs,
                   help="epochs of standard training before the distributed phase and the mask (default: %(default)s)")
    p.add_argument("--num-samples", type=positive_int, default=d.num_samples, help="Fisher samples N (default: %(default)s)")
    p.add_argument("--mask-every-exchanges", type=non_negative_int, default=0, metavar="R",
                   help="recompute the mask every R exchanges (default: 0 = fixed)")
    p.add_argument("--mask-every-epochs", type=non_negative_int, default=0, metavar="E",
                   help="recompute the mask every E epochs (default: 0 = fixed)")
    p.add_argument("--checkpoint-every-epochs", type=non_negative_int, default=0, metavar="E",
                   help="write a sparse checkpoint (SparseCheckpointer) every E epochs (default: 0 = none)")
    p.add_argument("--no-force-head", dest="force_head", action="store_false", help="do not force the fc head into the mask")
    p.add_argument("--blocks", type=positive_int, nargs="+", default=None, help="blocks per stage (default: 3 4 6 3; digits 1 1 1 1)")
    p.add_argument("--widths", type=positive_int, nargs="+", default=None,
                   help="channels per stage (default: 64 128 256 512; digits 8 16 32 64)")
    p.add_argument("--crop-padding", type=non_negative_int, default=None, help="default: 4 (digits 1)")
    p.add_argument("--cutout", type=non_negative_int, default=None, help="cutout square side (default: 8; digits 0)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None, help="default: on (digits off)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 (miniature: 0 1)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1… (default: cuda when available); one this "
                   "machine lacks is refused at once")
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads per worker (default: cores / workers)")
    p.add_argument("--max-train-samples", type=positive_int, default=None, help="use only the first N training images")
    p.add_argument("--max-test-samples", type=positive_int, default=None, help="use only the first N test images")
    p.add_argument("--verify-sync", action="store_true", help="check that all workers hold identical parameters after every exchange")
    p.add_argument("--save-states", action="store_true", help="write each run's parameters at the start of the "
                   "distributed phase and every rank's at the end (OUT_DIR/RUN/states/)")
    p.add_argument("--timeout", type=positive_float, default=d.timeout, help="seconds for any collective (default: %(default)s)")
    add_common(p)
    p.set_defaults(run=_run_cli)


def _run_cli(args) -> int:
    cfg = CifarConfig(
        out_dir=args.out_dir, dataset=args.dataset, data_dir=args.data_dir, methods=tuple(args.methods),
        densities=tuple(args.density), merge_intervals=tuple(args.merge_interval), workers=args.workers,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, lr_warmup_epochs=args.lr_warmup_epochs,
        momentum=args.momentum, nesterov=args.nesterov, weight_decay=args.weight_decay,
        dense_warmup_epochs=args.dense_warmup_epochs, num_samples=args.num_samples,
        mask_every_exchanges=args.mask_every_exchanges, mask_every_epochs=args.mask_every_epochs,
        checkpoint_every_epochs=args.checkpoint_every_epochs, force_head=args.force_head,
        blocks=tuple(args.blocks) if args.blocks else None, widths=tuple(args.widths) if args.widths else None,
        crop_padding=args.crop_padding, cutout=args.cutout, flip=args.flip, seeds=tuple(args.seeds or (0,)),
        device=args.device, threads=args.threads, max_train_samples=args.max_train_samples,
        max_test_samples=args.max_test_samples, verify_sync=args.verify_sync, save_states=args.save_states,
        timeout=args.timeout, benchmark_steps=args.benchmark_steps, overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    try:
        (miniature.miniature_config(cfg) if args.miniature else cfg).check()
    except ValueError as e:
        print(f"fishkern cifar: error: {e}", file=sys.stderr)
        return 2
    if args.miniature:
        plan = miniature.MiniaturePlan(seeds=tuple(args.seeds)) if args.seeds else miniature.MiniaturePlan()
        rep = miniature.run_miniature(cfg, plan)
        print(miniature.render_miniature(rep))
        print(f"wrote {cfg.out_dir}/{', '.join(miniature.MINIATURE_FILES)} ({rep['seconds']:.0f} s)")
        return 0
    if args.benchmark_steps:
        rep = benchmark.run_benchmark(cfg)
        print(benchmark.render_benchmark(rep))
        print(f"wrote {cfg.out_dir}/benchmark.json, benchmark.md")
        return 0
    rep = run.run_cifar(cfg)  # looked up when called: tests replace it
    if rep is not None:
        print(render_runs(rep))
        print(f"wrote {cfg.out_dir}/results.json, report.md")
    return 0
