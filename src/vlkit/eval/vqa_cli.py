"""``vlkit eval vqa``: its options and runner (the engine is :mod:`vlkit.eval.vqa`, imported only when it runs, so
that ``vlkit --help`` does not pay for torch)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

EXIT_OK, EXIT_USAGE = 0, 2


# ------------------------------------------------------------------------------------------------------ command


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``vlkit eval vqa``."""
    from vlkit.utils.argtypes import positive_int

    p.add_argument(
        "--model",
        required=True,
        metavar="PATH",
        help="a NeVA model directory, training checkpoint (stage 1's projector-only ones too), run directory (its "
        "latest checkpoint) or converted / Hugging Face LLaVA directory",
    )
    p.add_argument(
        "--data",
        required=True,
        metavar="FILE",
        help="questions: LLaVA-style JSON/JSONL ({question_id, image, text|question, answer|answers}) or LLaVA "
        "conversations (every gpt turn is a question), e.g. shapes-vqa's instruct_val.json",
    )
    p.add_argument("--image-folder", default=None, metavar="DIR", help="image paths are relative to it (default: "
                   "the data file's folder)")  # fmt: skip
    p.add_argument("--tokenizer", default=None, metavar="DIR", help="the LLM tokenizer (default: the model's)")
    p.add_argument("--template", default=None, help="conversation template (default: the model's training template)")
    p.add_argument("--match", default=None, metavar="REGEX", help="only questions matching REGEX (case-insensitive), "
                   "e.g. 'colou?r'")  # fmt: skip
    p.add_argument("--max-new-tokens", type=positive_int, default=32, help="answer length limit (32)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="questions per generation batch (32)")
    p.add_argument("--max-samples", type=positive_int, default=None, help="evaluate at most N questions")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="autocast dtype: auto = bf16 on CUDA, fp32 on CPU")  # fmt: skip
    p.add_argument("--dataset-name", default=None, help="the dataset's name in the report (default: --data)")
    p.add_argument("--model-name", default=None, help="the model's name in the report (default: its folder name)")
    p.add_argument("--answers", default=None, metavar="FILE", help="also write every answer as JSONL to FILE")
    p.add_argument("--json", action="store_true", help="print the CLIP_benchmark-style JSON result instead of text")
    p.add_argument("--output", default=None, metavar="FILE", help="also write the JSON result to FILE")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """``vlkit eval vqa``; returns the exit code (2 for a missing path, a model that is not NeVA, bad data)."""
    from vlkit.eval.results import EvalUsageError
    from vlkit.eval.vqa import evaluate_vqa, load_assistant

    try:
        if not os.path.exists(args.data):
            raise EvalUsageError(f"--data {args.data}: no such file")
        assistant, chosen = load_assistant(args.model, tokenizer=args.tokenizer, template=args.template,
                                           device=args.device, precision=args.precision)  # fmt: skip
        try:
            result = evaluate_vqa(
                assistant,
                args.data,
                image_folder=args.image_folder,
                batch_size=args.batch_size,
                max_new_tokens=args.max_new_tokens,
                max_samples=args.max_samples,
                match=args.match,
                progress=not (args.quiet or args.json),
                dataset_name=args.dataset_name,
                model_name=args.model_name,
                model_path=args.model,
            )
        except ValueError as e:  # malformed data (EvalUsageError is one too)
            raise EvalUsageError(str(e)) from None
    except (EvalUsageError, FileNotFoundError) as e:
        print(f"vlkit eval vqa: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    result.info.update(tokenizer=chosen["tokenizer"], aspect=chosen["aspect"])
    if args.answers:
        path = Path(args.answers)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(p) + "\n" for p in result.details["predictions"]), encoding="utf-8")
    if args.output:
        result.write_json(args.output)
    print(json.dumps(result.to_json(), indent=2) if args.json else format_vqa(result))
    return EXIT_OK


def format_vqa(result) -> str:
    """A short text report: what was evaluated, then one metric per line."""
    info = result.info
    what = f"{result.num_samples} questions, template {info['template']}"
    if info.get("skipped"):
        what += f", {sum(info['skipped'].values())} skipped (image missing)"
    width = max(len(k) for k in result.metrics)
    lines = [f"vqa  model={result.model}  data={result.dataset}  ({what})"]
    lines += [f"  {name:<{width}}  {value:.4f}" for name, value in result.metrics.items()]
    if info["finish_reasons"].get("length"):
        lines.append(f"  ({info['finish_reasons']['length']} answers hit --max-new-tokens)")
    return "\n".join(lines)
