"""``vlkit eval llava-bench NAME``: its options and runner (the engine is :mod:`vlkit.eval.llava_bench`, imported only
when it runs).

One sub-command per benchmark name, like LLaVA's ``scripts/v1_5/eval/NAME.sh``: each benchmark has its own files
(annotations, splits, a TSV with images), its own scores and its own submission file, which would crowd
``vlkit eval vqa``'s options.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

EXIT_OK, EXIT_USAGE = 0, 2

EPILOG = """benchmarks and their files (LLaVA-1.5's playground/data/eval layout):
  vqav2    --data v2_OpenEnded_mscoco_val2014_questions.json --annotations v2_mscoco_val2014_annotations.json
           --image-folder val2014      (or --data llava_vqav2_mscoco_test-dev2015.jsonl --image-folder test2015)
  gqa      --data testdev_balanced_questions.json --image-folder images   (or llava_gqa_testdev_balanced.jsonl
           with --annotations testdev_balanced_questions.json)
  sqa      --data scienceqa/ (problems.json + pid_splits.json, images/test/<pid>/image.png) [--split test]
           (or --data llava_test_CQM-A.json --image-folder images/test)
  mmbench  --data mmbench_dev_20230712.tsv [--circular]
  pope     --data pope/coco/ (coco_pope_{adversarial,popular,random}.json) --image-folder val2014
           (or --data llava_pope_test.jsonl --annotations pope/coco/)

examples:
  vlkit eval llava-bench vqav2 --model models/llava-1.5-7b --data vqav2/llava_vqav2_mscoco_test-dev2015.jsonl \\
      --image-folder vqav2/test2015 --out answers/vqav2
  vlkit eval llava-bench pope --model runs/neva-finetune --data pope/coco --image-folder coco/val2014 --json"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``vlkit eval llava-bench``."""
    from vlkit.eval.llava_bench import BENCHMARKS
    from vlkit.utils.argtypes import positive_int

    p.add_argument("benchmark", choices=tuple(BENCHMARKS), metavar="NAME",
                   help=" | ".join(BENCHMARKS) + " (their files: below)")  # fmt: skip
    p.add_argument("--model", required=True, metavar="PATH", help="a NeVA model directory, training checkpoint, run "
                   "directory or converted / Hugging Face LLaVA directory")  # fmt: skip
    p.add_argument("--data", required=True, metavar="PATH", help="the benchmark's question file or folder (below)")
    p.add_argument("--annotations", default=None, metavar="PATH", help="VQAv2 annotations JSON; GQA questions JSON "
                   "(answers for LLaVA's question file); POPE label folder (for llava_pope_test.jsonl)")  # fmt: skip
    p.add_argument("--image-folder", default=None, metavar="DIR", help="image paths are relative to it (default: the "
                   "data's folder; ScienceQA: images/<split> beside problems.json)")  # fmt: skip
    p.add_argument("--split", default="test", help="ScienceQA split in pid_splits.json (test)")
    p.add_argument("--circular", action="store_true", help="MMBench: add the rotated copies of questions the TSV "
                   "has none of (index + k*1e6)")  # fmt: skip
    p.add_argument("--out", default=None, metavar="DIR", help="write answers.jsonl and the submission file here")
    p.add_argument("--submission-questions", default=None, metavar="FILE", help="VQAv2: the test2015 questions "
                   "(official JSON or LLaVA's llava_vqav2_mscoco_test2015.jsonl); the submission lists every one, "
                   "\"\" where not answered, as the server requires")  # fmt: skip
    p.add_argument("--tokenizer", default=None, metavar="DIR", help="the LLM tokenizer (default: the model's)")
    p.add_argument("--template", default=None, help="conversation template (default: the model's training template)")
    p.add_argument("--max-new-tokens", type=positive_int, default=32, help="answer length limit (32)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="questions per generation batch (32)")
    p.add_argument("--max-samples", type=positive_int, default=None, help="evaluate the first N questions only")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="autocast dtype: auto = bf16 on CUDA, fp32 on CPU")  # fmt: skip
    p.add_argument("--dataset-name", default=None, help="the dataset's name in the report (default: --data)")
    p.add_argument("--model-name", default=None, help="the model's name in the report (default: its folder name)")
    p.add_argument("--json", action="store_true", help="print the JSON result instead of text")
    p.add_argument("--output", default=None, metavar="FILE", help="also write the JSON result to FILE")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """``vlkit eval llava-bench``; returns the exit code (2 for a missing or malformed file, naming it)."""
    from vlkit.eval.llava_bench import evaluate_llava_bench, read_benchmark
    from vlkit.eval.llava_bench_data import read_vqav2
    from vlkit.eval.results import EvalUsageError
    from vlkit.eval.vqa import load_assistant

    name = args.benchmark
    try:
        files = (("--data", args.data), ("--annotations", args.annotations),
                 ("--submission-questions", args.submission_questions))  # fmt: skip
        for option, value in files:
            if value is not None and not os.path.exists(value):
                raise EvalUsageError(f"{option} {value}: no such file or directory")
        # The files first: a wrong layout should not cost a model load.
        items = read_benchmark(name, args.data, annotations=args.annotations, split=args.split,
                               circular=args.circular)  # fmt: skip
        submission_ids = None
        if args.submission_questions is not None:
            if name != "vqav2":
                raise EvalUsageError("--submission-questions is for vqav2 (its test-dev submission)")
            if args.out is None:
                raise EvalUsageError("--submission-questions needs --out (where the submission is written)")
            submission_ids = [it.question_id for it in read_vqav2(args.submission_questions)]
        assistant, chosen = load_assistant(args.model, tokenizer=args.tokenizer, template=args.template,
                                           device=args.device, precision=args.precision)  # fmt: skip
        result = evaluate_llava_bench(
            assistant,
            name,
            args.data,
            items=items,
            image_folder=args.image_folder,
            split=args.split,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            max_samples=args.max_samples,
            out_dir=args.out,
            submission_ids=submission_ids,
            progress=not (args.quiet or args.json),
            dataset_name=args.dataset_name,
            model_name=args.model_name,
            model_path=args.model,
        )
    except (ValueError, FileNotFoundError) as e:  # EvalUsageError and DataError are ValueErrors
        print(f"vlkit eval llava-bench {name}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    result.info.update(tokenizer=chosen["tokenizer"], aspect=chosen["aspect"])
    if args.output:
        result.write_json(args.output)
    print(json.dumps(result.to_json(), indent=2) if args.json else format_bench(result))
    return EXIT_OK


def format_bench(result) -> str:
    """A short text report: what was evaluated, the files written, then one metric per line."""
    info = result.info
    what = f"{result.num_samples} questions, {info['num_scored']} scored, template {info['template']}"
    if info.get("skipped"):
        what += f", {sum(info['skipped'].values())} skipped (image missing)"
    lines = [f"{result.task}  model={result.model}  data={result.dataset}  ({what})"]
    if result.metrics:
        width = max(len(k) for k in result.metrics)
        lines += [f"  {k:<{width}}  {v:.4f}" for k, v in result.metrics.items()]
    else:
        lines.append("  (no reference answers: no scores; see the submission file)")
    lines += [f"  wrote {f}" for f in info.get("files", [])]
    if info["finish_reasons"].get("length"):
        lines.append(f"  ({info['finish_reasons']['length']} answers hit --max-new-tokens)")
    return "\n".join(lines)
