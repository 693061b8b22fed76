"""``vlkit train CONFIG [key=value ...]`` — single process or under torchrun / srun."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model from a preset or YAML config (single process, torchrun or srun)",
        description="Train a model. The config is a preset (e.g. clip-tiny-shapes) or a YAML file; key=value "
        "overrides follow. Under torchrun (or srun) every process runs this same command.",
        epilog="examples:\n  vlkit train clip-tiny-shapes trainer.max_steps=200\n"
        "  torchrun --nproc_per_node 2 -m vlkit train clip-tiny-shapes parallel.fsdp=true\n"
        "  vlkit train clip-tiny-shapes trainer.checkpoint.resume=latest",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="preset name or YAML path")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--quiet", "-q", action="store_true", help="print only warnings and errors (metrics still go to "
                   "<output_dir>/metrics.jsonl and tb/)")  # fmt: skip
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vlkit.config import load_config
    from vlkit.train.preflight import check_data_paths, preflight

    cfg = load_config(args.config, args.overrides)  # a bad config exits 2 before any work
    if cfg.data.kind != "synthetic_shapes" and not cfg.data.train_path:
        hint = "pass data.train_path=... with your shards, e.g. '/data/cc3m/{0000..0331}.tar'"
        print(f"vlkit train: error: data.train_path is not set ({args.config} reads data.kind={cfg.data.kind}; {hint})",
              file=sys.stderr)  # fmt: skip
        return 2
    check_data_paths(cfg.data)  # before torch is even imported: a wrong path fails in a fraction of a second
    preflight(cfg)  # and a model too large for the machine, counted on the meta device: before anything is built
    if cfg.model.arch == "neva":  # a stage 2 before its stage 1: said before any dataset or model is made
        from vlkit.tasks.neva import check_stage1_adapter

        check_stage1_adapter(cfg)
    from vlkit.parallel import cleanup
    from vlkit.tasks import task_for
    from vlkit.train.trainer import NonFiniteLossError

    finished_together = False  # every rank raises NonFiniteLossError at the same step (the loss is all-reduced)
    try:
        _fit(cfg, task_for(cfg.model.arch), quiet=getattr(args, "quiet", False))
        finished_together = True
    except NonFiniteLossError as e:
        finished_together = True
        print(f"vlkit train: {e}", file=sys.stderr)
        return 1
    finally:
        cleanup(wait_for_peers=finished_together)
    return 0


def _fit(cfg, task_cls, quiet: bool = False) -> None:
    # Its own frame, so the trainer (and the process groups its model holds) is released before cleanup().
    from vlkit.train.trainer import Trainer

    trainer = Trainer(cfg, task_cls)
    trainer.quiet = quiet
    trainer.fit()
