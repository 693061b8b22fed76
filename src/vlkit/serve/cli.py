"""``vlkit serve --model PATH [--index DIR]``: an OpenAI-compatible HTTP API and a web page for a trained model.

FastAPI and uvicorn come with the ``vlkit[serve]`` extra and are imported only when the command runs.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import sys

from vlkit.utils.argtypes import positive_int
from vlkit.utils.errors import UserError

API_KEY_ENV = "VLKIT_API_KEY"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API, with a web page",
        description="Serve a NeVA model (POST /v1/chat/completions, OpenAI's format, streamed or not), a CLIP model "
        "(/v1/embeddings, zero-shot /v1/classify, /v1/search over --index) or a ViT classifier (/v1/classify), "
        "with /v1/models, /health, /metrics (Prometheus) and a web page at /. Concurrent requests share forward "
        "passes. Binds 127.0.0.1 unless --host says otherwise; --api-key requires a bearer token.",
        epilog="examples:\n  vlkit serve --model runs/neva-tiny-finetune\n"
        "  vlkit serve --model runs/clip-tiny-shapes --index index/shapes --port 8080\n"
        "  VLKIT_API_KEY=secret vlkit serve --model runs/vit-tiny-shapes --host 0.0.0.0",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, metavar="PATH", help="a model, checkpoint or run directory (or a "
                   "converted HF / open_clip / LLaVA directory)")  # fmt: skip
    p.add_argument("--index", default=None, metavar="DIR", help="an index made by `vlkit embed` with this CLIP model, "
                   "for /v1/search")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV), metavar="KEY", help="require "
                   f"'Authorization: Bearer KEY' on /v1 and /metrics (default: ${API_KEY_ENV})")  # fmt: skip
    p.add_argument("--allow-local-files", action="store_true", help="accept image URLs that are paths on the "
                   "server (file://...); by default only inline data URLs")  # fmt: skip
    p.add_argument("--max-image-pixels", type=positive_int, default=50_000_000, metavar="N",
                   help="refuse images with more pixels, checked before decoding (default 50000000)")  # fmt: skip
    p.add_argument("--max-request-mb", type=float, default=20.0, metavar="N", help="refuse request bodies over N MB "
                   "(default 20)")  # fmt: skip
    p.add_argument("--max-batch", type=positive_int, default=32, metavar="N", help="most items per forward pass "
                   "(embeddings, classification) and conversations decoded together (chat) (default 32)")  # fmt: skip
    p.add_argument("--max-wait-ms", type=float, default=5.0, metavar="MS", help="how long a request waits for others "
                   "to share its forward pass (default 5)")  # fmt: skip
    p.add_argument("--device", default="auto", help="auto (CUDA when available) | cpu | cuda[:N]")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="autocast dtype: auto = bf16 on CUDA, fp32 on CPU")  # fmt: skip
    p.add_argument("--name", default=None, help="the model's name in the API (default: the model directory's name)")
    p.add_argument("--access-log", action="store_true", help="log every request (off by default: a line per request "
                   "costs as much as a small forward pass)")  # fmt: skip
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        missing = f"vlkit serve needs FastAPI and uvicorn ({e.name} is missing)"
        raise UserError(f"{missing}: pip install 'vlkit[serve]'") from None
    if not (math.isfinite(args.max_request_mb) and math.isfinite(args.max_wait_ms)) or args.max_request_mb <= 0 \
            or args.max_wait_ms < 0:  # fmt: skip
        raise UserError("--max-request-mb must be > 0 and --max-wait-ms >= 0")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port} is not a port number (0-65535)")

    from vlkit.serve.app import Settings, create_app
    from vlkit.serve.models import load_served

    served = load_served(args.model, index=args.index, device=args.device, precision=args.precision, name=args.name,
                         max_batch=args.max_batch)  # fmt: skip
    settings = Settings(api_key=args.api_key or None, allow_local_files=args.allow_local_files,
                        max_image_pixels=args.max_image_pixels, max_request_mb=args.max_request_mb,
                        max_batch=args.max_batch, max_wait_ms=args.max_wait_ms)  # fmt: skip
    if not _loopback(args.host) and not settings.api_key:
        print(f"vlkit serve: warning: listening on {args.host} without --api-key: anyone who can reach this port can "
              "use the model", file=sys.stderr)  # fmt: skip
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"vlkit serve: {served.kind} model '{served.id}' on http://{host}:{args.port} (Ctrl-C stops)",
          file=sys.stderr)  # fmt: skip
    app = create_app(served, settings)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", access_log=args.access_log)
    return 0


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
