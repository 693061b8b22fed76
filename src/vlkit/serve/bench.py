"""``vlkit bench serve``: what batching buys a served model — throughput and p50/p99 latency with N concurrent
clients against the same model served one request at a time, and, for a NeVA, against transformers' ``generate``.

Both servers run here, one after the other, on a free 127.0.0.1 port, with the same model and the same requests; they
differ only in ``--max-batch`` (1 = one request at a time). Every answer is checked: an embedding against the
one-at-a-time server's for the same input (the batched forward must not change it beyond float noise), a chat answer
for its shape and usage. The transformers baseline runs the same weights (``--hf DIR``: a LlavaForConditionalGeneration
directory, e.g. the one the NeVA was converted from with ``vlkit convert --from llava``) with ``generate`` one request
at a time, forced to the same number of new tokens, in this process (no HTTP): the cost of serving with it is not
counted, so the comparison favours it.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vlkit.utils.argtypes import positive_int
from vlkit.utils.errors import UserError

WORKLOADS = ("embed-image", "embed-text", "chat")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="served throughput and p50/p99 latency: batched vs one request at a time (and transformers' generate)",
        description=(__doc__ or "").split("\n\n")[0].replace("``", ""),
        epilog="examples:\n  vlkit bench serve --model runs/clip-tiny-shapes --workload embed-image\n"
        "  vlkit bench serve --model models/neva-from-llava --workload chat --hf llava-hf-dir --max-tokens 32",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, metavar="PATH", help="the model to serve (as vlkit serve --model)")
    p.add_argument("--workload", choices=WORKLOADS, default=None,
                   help="what the clients ask (default: embed-image for CLIP, chat for NeVA)")  # fmt: skip
    p.add_argument("--clients", type=positive_int, default=16, metavar="N", help="concurrent clients (16)")
    p.add_argument("--requests", type=positive_int, default=200, metavar="N", help="requests in all (200)")
    p.add_argument("--max-batch", type=positive_int, default=32, metavar="N", help="the batched server's (32)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, metavar="MS", help="the batched server's (5)")
    p.add_argument("--max-tokens", type=positive_int, default=16, metavar="N", help="chat: new tokens per answer")
    p.add_argument("--image-size", type=positive_int, default=224, metavar="PX", help="side of the test images")
    p.add_argument("--hf", default=None, metavar="DIR", help="chat: a transformers LLaVA directory with the same "
                   "weights, for the generate() baseline")  # fmt: skip
    p.add_argument("--device", default="auto", help="auto (CUDA when available) | cpu | cuda[:N]")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=run)


# ------------------------------------------------------------------------------------------------------ load
@dataclass
class LoadResult:
    """What ``clients`` concurrent clients saw over ``len(latencies_s)`` requests."""

    clients: int
    seconds: float
    latencies_s: list[float] = field(repr=False)
    failures: list[str] = field(default_factory=list)
    units: int = 0  # what the workload counts besides requests: completion tokens for chat

    @property
    def requests(self) -> int:
        return len(self.latencies_s)

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds

    def percentile(self, q: float) -> float:
        """The q-quantile of the latencies (nearest rank: an observed latency, never an interpolation)."""
        ordered = sorted(self.latencies_s)
        return ordered[max(0, min(len(ordered) - 1, round(q * len(ordered) + 0.5) - 1))]

    def summary(self) -> dict[str, Any]:
        return {
            "clients": self.clients,
            "requests": self.requests,
            "failures": len(self.failures),
            "seconds": round(self.seconds, 3),
            "requests_per_s": round(self.throughput, 2),
            "p50_ms": round(1000 * self.percentile(0.50), 1),
            "p99_ms": round(1000 * self.percentile(0.99), 1),
            **({"tokens_per_s": round(self.units / self.seconds, 1)} if self.units else {}),
        }


def run_load(send: Callable[[int], int], requests: int, clients: int) -> LoadResult:
    """Send requests ``0 .. requests-1`` from ``clients`` threads, each taking the next number as it finishes one.

    ``send(i)`` performs request i and returns the units it produced (0 when the workload counts none); an exception
    is a failure, recorded with the request number, never a lost request: every number is sent exactly once.
    """
    counter = iter(range(requests))
    lock = threading.Lock()
    latencies: list[float] = []
    failures: list[str] = []
    units = [0]

    def client() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            start = time.perf_counter()
            try:
                produced = send(i)
            except Exception as e:  # a failed request is a result, reported; the others go on
                with lock:
                    failures.append(f"request {i}: {type(e).__name__}: {e}")
                continue
            with lock:
                latencies.append(time.perf_counter() - start)
                units[0] += produced

    threads = [threading.Thread(target=client, name=f"client-{c}") for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return LoadResult(clients, time.perf_counter() - start, latencies, failures, units[0])


# ------------------------------------------------------------------------------------------------------ inputs
def data_url(image: Any) -> str:
    """A PIL image as an inline PNG data URL (what OpenAI clients send)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def sample_images(count: int, size: int, seed: int = 0) -> list[str]:
    """``count`` distinct images (random coloured rectangles and ellipses on noise), as data URLs."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    urls = []
    for _ in range(count):
        image = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(3):
            x0, y0 = rng.integers(0, size // 2, 2)
            w, h = rng.integers(size // 8, size // 2, 2)
            x1, y1 = x0 + w, y0 + h
            color = tuple(int(c) for c in rng.integers(0, 255, 3))
            (draw.rectangle if rng.random() < 0.5 else draw.ellipse)((x0, y0, x1, y1), fill=color)
        urls.append(data_url(image))
    return urls


def sample_texts(count: int) -> list[str]:
    colors = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
    shapes = ("circle", "square", "triangle", "star", "hexagon", "cross")
    return [f"a {colors[i % 8]} {shapes[(i // 8) % 6]} number {i}" for i in range(count)]


# ------------------------------------------------------------------------------------------------------ workloads
def _post(client: Any, path: str, body: dict) -> dict:
    response = client.post(path, json=body)
    if response.status_code != 200:
        raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
    return response.json()


def embedding_sender(client: Any, inputs: list[Any], model: str, out: dict[int, list[float]]) -> Callable[[int], int]:
    """Request i embeds ``inputs[i % len(inputs)]``; its vector goes to ``out[i]``."""

    def send(i: int) -> int:
        data = _post(client, "/v1/embeddings", {"model": model, "input": [inputs[i % len(inputs)]]})["data"]
        if len(data) != 1:
            raise RuntimeError(f"{len(data)} embeddings for one input")
        out[i] = data[0]["embedding"]
        return 0

    return send


def chat_sender(client: Any, images: list[str], model: str, max_tokens: int) -> Callable[[int], int]:
    questions = ("What colour is the shape?", "What shape is it?", "Describe the image.")

    def send(i: int) -> int:
        content = [{"type": "text", "text": questions[i % 3]},
                   {"type": "image_url", "image_url": {"url": images[i % len(images)]}}]  # fmt: skip
        body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                "temperature": 0}  # fmt: skip
        reply = _post(client, "/v1/chat/completions", body)
        if reply["choices"][0]["message"]["role"] != "assistant":
            raise RuntimeError("no assistant message")
        return int(reply["usage"]["completion_tokens"])

    return send


def serve_and_load(path: str, settings: Any, device: str, make_send: Callable[[Any, str], Callable[[int], int]],
                   requests: int, clients: int) -> tuple[LoadResult, dict]:  # fmt: skip
    """Serve ``path`` with ``settings`` on a free loopback port, warm it up, run the load; (result, /v1/models)."""
    import httpx

    from vlkit.serve.app import BackgroundServer, create_app
    from vlkit.serve.models import load_served

    served = load_served(path, device=device, max_batch=settings.max_batch)
    with BackgroundServer(create_app(served, settings)) as server, httpx.Client(base_url=server.url, timeout=600) as c:
        models = c.get("/v1/models").json()["data"][0]
        send = make_send(c, models["id"])
        send(0)  # warm-up (first forward, allocator, thread pools): not timed
        result = run_load(send, requests, clients)
    return result, models


def _kind(path: str) -> str:
    from vlkit.interop.native import resolve_model_path
    from vlkit.serve.models import model_arch

    return "chat" if model_arch(resolve_model_path(path)) == "neva" else "embed-image"


def hf_generate_baseline(hf_dir: str, requests: int, max_tokens: int, device: str) -> dict:
    """transformers' ``generate`` on the same weights, one request at a time, each forced to ``max_tokens`` new
    tokens (``min_new_tokens``), greedy, with a LLaVA prompt of the same form; tokens/s and p50/p99 latency."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from vlkit.eval.runtime import resolve_device

    dev = resolve_device(device)
    model = LlavaForConditionalGeneration.from_pretrained(hf_dir).to(dev).eval()
    cfg = model.config
    size = cfg.vision_config.image_size
    patches = (size // cfg.vision_config.patch_size) ** 2
    prompt_len = 24
    vocab = cfg.text_config.vocab_size
    generator = torch.Generator().manual_seed(0)
    latencies, tokens = [], 0
    start = time.perf_counter()
    for i in range(requests + 1):
        ids = torch.randint(3, min(vocab, cfg.image_token_index) - 1, (1, prompt_len), generator=generator)
        ids = torch.cat([ids[:, :4], torch.full((1, patches), cfg.image_token_index), ids[:, 4:]], dim=1)
        pixels = torch.rand(1, 3, size, size, generator=generator)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(dev), pixel_values=pixels.to(dev), max_new_tokens=max_tokens,
                                 min_new_tokens=max_tokens, do_sample=False, pad_token_id=0)  # fmt: skip
        if i == 0:  # warm-up
            start = time.perf_counter()
            continue
        latencies.append(time.perf_counter() - t0)
        tokens += out.shape[1] - ids.shape[1]
    result = LoadResult(1, time.perf_counter() - start, latencies, units=tokens)
    return result.summary()


def run(args: argparse.Namespace) -> int:
    try:
        import httpx  # noqa: F401

        from vlkit.serve.app import Settings
    except ImportError as e:
        raise UserError(
            f"vlkit bench serve needs the serve extra and httpx ({e}): pip install 'vlkit[serve]' httpx"
        ) from None
    workload = args.workload or _kind(args.model)
    if (workload == "chat") != (_kind(args.model) == "chat"):
        raise UserError(f"--workload {workload} does not fit --model {args.model} ({_kind(args.model)} model)")
    if args.hf and workload != "chat":
        raise UserError("--hf is the chat workload's transformers baseline; embeddings have none")
    if workload == "chat":
        images = sample_images(8, args.image_size)

        def make_send(c: Any, model: str) -> Callable[[int], int]:
            return chat_sender(c, images, model, args.max_tokens)

        vectors: dict[str, dict[int, list[float]]] = {}
    else:
        inputs = sample_texts(args.requests) if workload == "embed-text" else sample_images(64, args.image_size)
        if workload == "embed-image":
            inputs = [{"type": "image_url", "image_url": {"url": u}} for u in inputs]
        vectors = {"batched": {}, "one": {}}

    rows = {}
    for name, max_batch in (("batched", args.max_batch), ("one", 1)):
        settings = Settings(max_batch=max_batch, max_wait_ms=args.max_wait_ms if max_batch > 1 else 0.0)
        if workload != "chat":

            def make_send(c: Any, model: str, out: dict = vectors[name]) -> Callable[[int], int]:
                return embedding_sender(c, inputs, model, out)

        result, models = serve_and_load(args.model, settings, args.device, make_send, args.requests, args.clients)
        rows[name] = {"max_batch": max_batch, **result.summary()}
        if result.failures:
            rows[name]["first_failures"] = result.failures[:3]
    if vectors:
        import numpy as np

        diff = max(float(np.abs(np.subtract(vectors["batched"][i], vectors["one"][i])).max())
                   for i in vectors["batched"] if i in vectors["one"])  # fmt: skip
        rows["batched"]["max_abs_diff_vs_one"] = diff
    report: dict[str, Any] = {
        "workload": workload,
        "model": models["id"],
        "kind": models.get("kind"),
        "rows": rows,
        "speedup_throughput": round(rows["batched"]["requests_per_s"] / rows["one"]["requests_per_s"], 2),
    }
    if args.hf:
        report["transformers_generate"] = hf_generate_baseline(args.hf, min(args.requests, 32), args.max_tokens,
                                                               args.device)  # fmt: skip
        ours = rows["batched"].get("tokens_per_s")
        report["speedup_tokens_vs_transformers"] = round(ours / report["transformers_generate"]["tokens_per_s"], 2)
    from vlkit.bench.common import machine_info
    from vlkit.eval.runtime import resolve_device

    report["machine"] = machine_info(resolve_device(args.device), ("fastapi", "uvicorn", "transformers"))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
    failed = sum(r["failures"] for r in rows.values())
    if failed:
        print(f"vlkit bench serve: {failed} request(s) failed", file=sys.stderr)
    return 1 if failed else 0


def format_report(report: dict) -> str:
    from vlkit.bench.common import format_columns

    head = ["server", "max batch", "clients", "requests", "failed", "req/s", "p50 ms", "p99 ms", "tokens/s"]
    rows = []
    for name, r in report["rows"].items():
        label = "batched" if name == "batched" else "one at a time"
        rows.append([label, r["max_batch"], r["clients"], r["requests"], r["failures"], r["requests_per_s"],
                     r["p50_ms"], r["p99_ms"], r.get("tokens_per_s", "-")])  # fmt: skip
    hf = report.get("transformers_generate")
    if hf:
        rows.append(["transformers generate", 1, 1, hf["requests"], 0, hf["requests_per_s"], hf["p50_ms"],
                     hf["p99_ms"], hf["tokens_per_s"]])  # fmt: skip
    lines = [f"vlkit bench serve: {report['workload']} on {report['model']} ({report['kind']})"]
    lines += format_columns(head, rows)
    lines.append(f"batched / one at a time: {report['speedup_throughput']}x requests/s")
    if "max_abs_diff_vs_one" in report["rows"]["batched"]:
        diff = report["rows"]["batched"]["max_abs_diff_vs_one"]
        lines.append(f"embeddings batched vs one at a time: max |diff| {diff:.2e}")
    if "speedup_tokens_vs_transformers" in report:
        lines.append(f"batched / transformers generate: {report['speedup_tokens_vs_transformers']}x tokens/s")
    return "\n".join(lines)
