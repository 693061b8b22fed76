"""``vlkit eval zeroshot | retrieval | classify | vqa | llava-bench --model PATH --data ... [--json]``.

Exit codes: 0 success, 2 bad usage (a missing path, the wrong kind of model, data that does not suit the task; the
message names it), 1 anything else. Under ``torchrun`` every process runs the same command and evaluates its part
of the data; rank 0 prints.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from vlkit.utils.argtypes import positive_int

EXIT_OK, EXIT_USAGE = 0, 2

COMMANDS = {
    "zeroshot": "zero-shot classification: top-1, top-5, mean per-class recall from prompt templates",
    "retrieval": "image<->text retrieval: recall@1/5/10, mean and median rank (several captions per image)",
    "classify": "classifier accuracy: top-1, top-5, mean per-class recall of a ViT classifier",
    "vqa": "visual question answering with a NeVA model: exact match and VQA accuracy of greedy answers",
    "llava-bench": "LLaVA-1.5's benchmarks with a NeVA model: vqav2, gqa, sqa (ScienceQA-IMG), mmbench, pope",
}
_EPILOGS = {
    "zeroshot": "examples:\n  vlkit eval zeroshot --model runs/clip-tiny-shapes --data data/shapes\n"
    "  vlkit eval zeroshot --model models/clip-b32 --data imagenet/val --classes imagenet --templates openai --json",
    "retrieval": "examples:\n  vlkit eval retrieval --model runs/clip-tiny-shapes --data data/shapes/val\n"
    "  vlkit eval retrieval --model models/clip-b32 --data 'coco/test-{0000..0004}.tar' --caption-key json",
    "classify": "examples:\n  vlkit eval classify --model runs/vit-tiny/checkpoints/step_00001000 \\\n"
    "      --data data/shapes-cls --json",
    "vqa": "examples:\n  vlkit eval vqa --model runs/neva-tiny-finetune --data data/shapes-vqa/instruct_val.json\n"
    "  vlkit eval vqa --model runs/neva-tiny-finetune --data data/shapes-vqa/instruct_val.json \\\n"
    "      --match 'colou?r' --json",
}


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``eval`` and its sub-commands to the ``vlkit`` parser (imports nothing heavy)."""
    p = sub.add_parser(
        "eval",
        help="evaluate: zeroshot | retrieval | classify | vqa | llava-bench",
        description="Evaluate a model: zero-shot classification, image-text retrieval or classifier accuracy. "
        "Results print as text, or with --json as CLIP_benchmark's JSON (dataset, model, task, metrics).",
    )
    group = p.add_subparsers(dest="eval_command", metavar="SUBCOMMAND", required=True)
    for name, help_text in COMMANDS.items():
        cp = group.add_parser(
            name,
            help=help_text,
            description=help_text[0].upper() + help_text[1:] + ".",
            epilog=_EPILOGS.get(name),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if name == "llava-bench":  # its own options, runner and epilog (benchmark files)
            from vlkit.eval import llava_bench_cli

            cp.epilog = llava_bench_cli.EPILOG
            llava_bench_cli.add_arguments(cp)
            cp.set_defaults(func=llava_bench_cli.run, eval_task=name)
            continue
        if name == "vqa":  # its own options and runner (a generative model, question files)
            from vlkit.eval import vqa_cli

            vqa_cli.add_arguments(cp)
            cp.set_defaults(func=vqa_cli.run, eval_task=name)
            continue
        _add_common(cp, name)
        cp.set_defaults(func=run, eval_task=name)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def _add_common(p: argparse.ArgumentParser, task: str) -> None:
    p.add_argument(
        "--model",
        required=True,
        metavar="PATH",
        help="a vlkit model directory (vlkit.save_model, vlkit convert) or a training checkpoint; a run directory or "
        "its checkpoints/ folder means its latest checkpoint",
    )
    data_help = {
        "zeroshot": "an ImageFolder, webdataset shards with .cls labels (directory, .tar, brace range, glob, URL), "
        "or a dataset root with a val/ split",
        "retrieval": "webdataset shards with captions (directory, .tar, brace range, glob, URL), or a dataset root "
        "with a val/ split",
        "classify": "an ImageFolder, webdataset shards with .cls labels, or a dataset root with a val/ split",
    }[task]
    p.add_argument("--data", required=True, metavar="DATA", help=data_help)
    p.add_argument("--split", default=None, help="sub-folder of --data to evaluate (default: val/ when --data has it)")
    if task == "zeroshot":
        p.add_argument(
            "--classes",
            default=None,
            metavar="FILE|imagenet",
            help="class names: a classes.json, a JSON list or a text file with one name per line, or 'imagenet' "
            "(default: the dataset's classes.json, else ImageNet's 1000 names)",
        )
        p.add_argument(
            "--templates",
            default=None,
            metavar="openai|openai7|simple|FILE",
            help="prompt templates with {} for the class name: openai (80), openai7, simple ('a photo of a {}.'), "
            "or a file (JSON list, classes.json, one per line) (default: the classes.json's templates, else openai)",
        )
        p.add_argument("--text-batch-size", type=positive_int, default=256, help="prompts per forward (256)")
    if task in ("zeroshot", "retrieval"):
        p.add_argument("--tokenizer", default=None, help="tokenizer name or path (default: the model config's)")
    if task == "retrieval":
        p.add_argument(
            "--caption-key",
            default="txt",
            help="shard member with the captions: txt (one caption per line) or json ({'captions': [...]} or a "
            "list) (txt)",
        )
        p.add_argument("--recall-k", type=_int_list, default=(1, 5, 10), metavar="K,K,...", help="(1,5,10)")
        p.add_argument(
            "--chunk-size", type=positive_int, default=4096, help="similarity block size, rows and columns (4096)"
        )
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per forward (64)")
    p.add_argument("--workers", type=int, default=2, help="data-loading worker processes (2)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    p.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "fp32", "bf16", "fp16"),
        help="autocast dtype: auto = bf16 on CUDA, fp32 on CPU",
    )
    p.add_argument("--max-samples", type=positive_int, default=None, help="evaluate at most N images")
    p.add_argument("--dataset-name", default=None, help="the dataset's name in the report (default: --data)")
    p.add_argument("--model-name", default=None, help="the model's name in the report (default: its folder name)")
    p.add_argument("--json", action="store_true", help="print CLIP_benchmark's JSON result instead of text")
    p.add_argument("--output", default=None, metavar="FILE", help="also write the JSON result to FILE")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """Run one ``vlkit eval`` sub-command; returns the exit code."""
    from vlkit.eval.results import EvalUsageError

    task = args.eval_task
    try:
        return _run(args, task)
    except (EvalUsageError, FileNotFoundError) as e:
        print(f"vlkit eval {task}: error: {e}", file=sys.stderr)
        return EXIT_USAGE


def _check_path(option: str, value: str) -> None:
    from vlkit.eval.results import EvalUsageError

    if not os.path.exists(value):
        raise EvalUsageError(f"{option} {value}: no such file or directory")


def _run(args: argparse.Namespace, task: str) -> int:
    from vlkit.config import ConfigError
    from vlkit.eval.data import is_shard_spec
    from vlkit.eval.results import EvalUsageError
    from vlkit.eval.runtime import resolve_device
    from vlkit.interop.native import ModelFormatError, load_model

    _check_path("--model", args.model)
    from vlkit.interop.native import resolve_model_path

    model_path = resolve_model_path(args.model)
    if not is_shard_spec(args.data):  # before loading the model: a typo should not cost a model load
        _check_path("--data", args.data)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        from vlkit.parallel import init_distributed

        accelerator = "cpu" if args.device == "cpu" else "auto"
        device = init_distributed(accelerator).device
    else:
        device = resolve_device(args.device)
    try:
        model = load_model(model_path, device=device)
    except (ModelFormatError, ConfigError) as e:
        raise EvalUsageError(f"--model {args.model}: {e}") from None
    try:
        result = _evaluate(model, args, task)
    finally:
        if distributed:
            from vlkit.parallel import cleanup

            cleanup()
    if int(os.environ.get("RANK", "0")) != 0:
        return EXIT_OK
    if args.output:
        result.write_json(args.output)
    print(json.dumps(result.to_json(), indent=2) if args.json else format_result(result))
    return EXIT_OK


def _evaluate(model, args: argparse.Namespace, task: str):
    from vlkit.eval.results import EvalUsageError

    tokenizer = None
    if getattr(args, "tokenizer", None):
        from vlkit.data.tokenizer import get_tokenizer

        text_cfg = getattr(model.config, "text", None)
        try:
            tokenizer = get_tokenizer(args.tokenizer, text_cfg.encoder_seq_length if text_cfg else None)
        except ValueError as e:
            raise EvalUsageError(f"--tokenizer {args.tokenizer}: {e}") from None
    common = dict(
        split=args.split,
        batch_size=args.batch_size,
        num_workers=max(0, args.workers),
        precision=args.precision,
        max_samples=args.max_samples,
        progress=not args.quiet,
        dataset_name=args.dataset_name,
        model_name=args.model_name,
        model_path=args.model,
    )
    if task == "zeroshot":
        from vlkit.eval.zeroshot import evaluate_zeroshot

        return evaluate_zeroshot(
            model,
            args.data,
            classnames=args.classes,
            templates=args.templates,
            tokenizer=tokenizer,
            text_batch_size=args.text_batch_size,
            **common,
        )
    if task == "retrieval":
        from vlkit.eval.retrieval import evaluate_retrieval

        return evaluate_retrieval(
            model,
            args.data,
            tokenizer=tokenizer,
            caption_key=args.caption_key,
            ks=args.recall_k,
            chunk_size=args.chunk_size,
            **common,
        )
    from vlkit.eval.classify import evaluate_classifier

    return evaluate_classifier(model, args.data, **common)


def format_result(result) -> str:
    """A short text report: what was evaluated, then one metric per line."""
    info = result.info
    what = f"{result.num_samples} images"
    if "num_classes" in info:
        # Where the names came from, always: a silent fallback to ImageNet's 1 000 classes reads as accuracy 0.
        what += f", {info['num_classes']} classes" + (f" ({info['classes']})" if info.get("classes") else "")
    if "num_templates" in info:
        what += f", {info['num_templates']} templates ({info['templates']})"
    if "num_texts" in info:
        what += f", {info['num_texts']} captions"
    skipped = sum(info.get("skipped", {}).values())
    if skipped:
        what += f", {skipped} skipped"
    width = max(len(k) for k in result.metrics)
    lines = [f"{result.task}  model={result.model}  data={result.dataset}  ({what})"]
    for name, value in result.metrics.items():
        text = f"{value:.2f}" if name.endswith("_rank") else f"{value:.4f}"
        lines.append(f"  {name:<{width}}  {text}")
    if result.task == "zeroshot_retrieval":
        lines.append("  (image_retrieval: text -> image; text_retrieval: image -> text; ranks start at 1)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vlkit.eval.cli zeroshot ...``: the ``eval`` command on its own (the same as ``vlkit eval``)."""
    parser = argparse.ArgumentParser(prog="vlkit")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args) or EXIT_OK)


if __name__ == "__main__":
    sys.exit(main())
