"""``vlkit chat --model PATH --image IMG [--prompt TEXT]``: talk to a NeVA (LLaVA-style) model about an image.

With ``--prompt`` it answers once and exits; without, it reads questions from stdin, one per line, keeping the
conversation (``/reset`` forgets it, ``/image PATH`` switches to another image and starts over, ``/quit`` or Ctrl-D
ends). Answers are greedy unless ``--temperature`` is above 0. The model is anything ``vlkit eval vqa`` reads: a run
directory (its latest checkpoint), a checkpoint (stage 1's projector-only ones too), a model directory or a
converted / Hugging Face LLaVA directory; its tokenizer, conversation template and image preprocessing come with it.

Exit codes: 0 success, 2 a missing or unusable model or image (the message names it), 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any, TextIO

from vlkit.utils.argtypes import positive_int

EXIT_OK, EXIT_USAGE = 0, 2
HELP_LINE = "/image PATH: another image (starts over) | /reset: forget the conversation | /quit or Ctrl-D: exit"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "chat",
        help="chat with a NeVA model about an image",
        description="Answer questions about an image with a NeVA (LLaVA-style) model: once with --prompt, else "
        f"interactively from stdin ({HELP_LINE}). Greedy by default; --temperature > 0 samples.",
        epilog="examples:\n  vlkit chat --model runs/neva-tiny-finetune --image data/shapes-vqa/images/val/"
        "val_0000000.png \\\n      --prompt 'What colour is the shape?'\n"
        "  vlkit chat --model llava-1.5-7b-vlkit --image photo.jpg --temperature 0.7 --top-p 0.9",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="PATH", help="NeVA model, checkpoint or run directory")
    p.add_argument("--image", required=True, metavar="IMG", help="the image to talk about")
    p.add_argument("--prompt", default=None, metavar="TEXT", help="answer this once and exit (default: interactive)")
    p.add_argument("--system", default=None, help="system prompt (default: the template's)")
    p.add_argument("--max-new-tokens", type=positive_int, default=128, metavar="N", help="answer length limit (128)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0: greedy (default); > 0: sample")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass (1.0: off)")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="sample from the K likeliest tokens (0: off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R", help="> 1 discourages repeats")
    p.add_argument("--stop", action="append", default=[], metavar="S",
                   help="also stop at this string (repeatable; the template's end markers always stop)")  # fmt: skip
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.add_argument("--tokenizer", default=None, metavar="DIR", help="the LLM tokenizer (default: the model's)")
    p.add_argument("--template", default=None, help="conversation template (default: the model's training template)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="autocast dtype: auto = bf16 on CUDA, fp32 on CPU")  # fmt: skip
    p.add_argument("--json", action="store_true", help="with --prompt: print {answer, finish_reason, ...} as JSON")


def run(args: argparse.Namespace) -> int:
    from vlkit.eval.results import EvalUsageError
    from vlkit.eval.vqa import load_assistant

    try:
        if not os.path.isfile(args.image):
            raise EvalUsageError(f"--image {args.image}: no such file")
        if args.temperature < 0:
            raise EvalUsageError(f"--temperature {args.temperature} must be >= 0 (0: greedy)")
        assistant, chosen = load_assistant(args.model, tokenizer=args.tokenizer, template=args.template,
                                           device=args.device, precision=args.precision, stops=args.stop)  # fmt: skip
        image = _load_image(assistant, args.image)
        settings = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
                    "top_k": args.top_k, "repetition_penalty": args.repetition_penalty, "seed": args.seed}  # fmt: skip
        if args.prompt is not None:
            answer = _ask(assistant, [], args.prompt, image, args.system, settings)
    except (EvalUsageError, ValueError) as e:  # bad settings (top_p, penalty) are ValueErrors of generate()
        print(f"vlkit chat: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if args.prompt is None:
        return repl(assistant, image, settings, system=args.system)
    if args.json:
        print(json.dumps({"answer": answer.text, "finish_reason": answer.finish_reason, "tokens": len(answer.tokens),
                          **chosen}, indent=2))  # fmt: skip
    else:
        print(answer.text)
    return EXIT_OK


def _load_image(assistant: Any, path: str) -> Any:
    """The transformed image; a missing or undecodable file is a usage error naming it."""
    from vlkit.eval.results import EvalUsageError

    if not os.path.isfile(path):
        raise EvalUsageError(f"{path}: no such file")
    try:
        return assistant.image_tensor(path)
    except ValueError as e:  # ImageDecodeError
        raise EvalUsageError(f"{path}: not a usable image ({e})") from None


def _ask(assistant: Any, history: list, text: str, image: Any, system: str | None, settings: dict) -> Any:
    """One answer to ``text`` after ``history`` (a list of turns; the image placeholder goes in the first one)."""
    from vlkit.data.conversation import HUMAN, IMAGE_TOKEN, Turn

    turns = [*history, Turn(HUMAN, text if history else f"{IMAGE_TOKEN}\n{text}")]
    return assistant.answer([turns], [image], systems=[system], **settings)[0]


def _fit_history(assistant: Any, history: list, settings: dict) -> list:
    """Drop the oldest exchanges while the conversation and the answer would not fit the LLM context."""
    from vlkit.data.conversation import IMAGE_TOKEN

    inner = assistant.inner
    context = inner.config.llm.encoder_seq_length
    extra = inner.num_image_tokens - 1 + settings["max_new_tokens"]
    while len(history) > 2:
        ids = assistant.chat(history).input_ids
        if len(ids) + extra <= context:
            break
        history = history[2:]
        history[0] = history[0]._replace(text=f"{IMAGE_TOKEN}\n{history[0].text}")
    return history


def repl(
    assistant: Any,
    image: Any,
    settings: dict,
    *,
    system: str | None = None,
    read: Callable[[str], str] = input,
    out: TextIO | None = None,
) -> int:
    """The interactive loop: a line in, an answer out, until /quit or end of input (Ctrl-D)."""
    from vlkit.data.conversation import GPT, HUMAN, IMAGE_TOKEN, Turn
    from vlkit.eval.results import EvalUsageError

    out = out or sys.stdout
    plain = assistant.chat.template.plain  # a stage-1 model takes one exchange: every question starts over
    print(HELP_LINE + (" (plain template: no conversation memory)" if plain else ""), file=out)
    history: list = []
    while True:
        try:
            line = read("you> ").strip()
        except EOFError:
            print(file=out)
            return EXIT_OK
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return EXIT_OK
        if line == "/reset":
            history = []
            print("(conversation cleared)", file=out)
            continue
        if line == "/image" or line.startswith("/image "):
            try:
                image = _load_image(assistant, line[len("/image") :].strip())
            except EvalUsageError as e:
                print(f"error: {e}", file=out)
                continue
            history = []
            print("(new image; conversation cleared)", file=out)
            continue
        if line.startswith("/"):
            print(f"unknown command {line.split()[0]}; {HELP_LINE}", file=out)
            continue
        answer = _ask(assistant, [] if plain else history, line, image, system, settings)
        print(f"assistant> {answer.text}", file=out, flush=True)
        if not plain:
            asked = Turn(HUMAN, line if history else f"{IMAGE_TOKEN}\n{line}")
            history = _fit_history(assistant, [*history, asked, Turn(GPT, answer.text)], settings)
