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
import asyncio
import base64
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from vlkit.utils.argtypes import positive_int
from vlkit.utils.errors import UserError

WORKLOADS = ("embed-image", "embed-text", "chat")
Send = Callable[["Connection", int], Awaitable[int]]  # (a connection, request number) -> units produced


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
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    def percentile(self, q: float) -> float:
        """The q-quantile of the latencies (nearest rank: an observed latency, never an interpolation)."""
        ordered = sorted(self.latencies_s)
        if not ordered:  # every request failed
            return float("nan")
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


class Reply:
    """An HTTP answer: ``status_code``, ``content``, ``text``, ``json()``."""

    def __init__(self, status_code: int, content: bytes):
        self.status_code, self.content = status_code, content

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return json.loads(self.content)


class Connection:
    """One keep-alive HTTP/1.1 connection to the server under load, speaking only what the bench needs: a POST with a
    JSON body and its answer (Content-Length or chunked). A load generator must cost far less than what it measures:
    httpx's AsyncClient spends ~2.7 ms of CPU per small request on 2 cores, as much as the server's whole work for a
    batched embedding, which would cap the batched server's measured throughput at the client's; this costs ~0.2 ms."""

    def __init__(self, url: str):
        parsed = urlsplit(url)
        self.host, self.port = parsed.hostname or "127.0.0.1", parsed.port or 80
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def post(self, path: str, body: dict) -> Reply:
        if self._streams is None:
            self._streams = await asyncio.open_connection(self.host, self.port)
        reader, writer = self._streams
        data = json.dumps(body).encode()
        writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(data)}\r\n\r\n".encode() + data)  # fmt: skip
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(head[0].split(" ", 2)[1])
        headers = dict(line.lower().split(": ", 1) for line in head[1:] if ": " in line)
        if headers.get("transfer-encoding") == "chunked":
            content = b""
            while size := int((await reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16):
                content += (await reader.readexactly(size + 2))[:-2]
            await reader.readuntil(b"\r\n")  # the empty trailer
        else:
            content = await reader.readexactly(int(headers.get("content-length", 0)))
        if headers.get("connection") == "close":
            await self.aclose()
        return Reply(status, content)

    async def aclose(self) -> None:
        if self._streams is not None:
            self._streams[1].close()
            self._streams = None


async def run_load(url: str, send: Send, requests: int, clients: int) -> LoadResult:
    """Send requests ``0 .. requests-1`` to ``url`` from ``clients`` concurrent connections, each taking the next
    number as it finishes one (asyncio: a client costs no thread, so the load generator stays light next to the
    server it measures).

    ``send(connection, i)`` performs request i and returns the units it produced (0 when the workload counts none);
    an exception is a failure, recorded with the request number, never a lost request: every number is sent exactly
    once.
    """
    counter = iter(range(requests))
    latencies: list[float] = []
    failures: list[str] = []
    units = 0

    async def client(connection: Connection) -> None:
        nonlocal units
        for i in counter:
            start = time.perf_counter()
            try:
                produced = await send(connection, i)
            except Exception as e:  # a failed request is a result, reported; the others go on
                failures.append(f"request {i}: {type(e).__name__}: {e}")
                await connection.aclose()  # a half-read answer must not be taken for the next one's
                continue
            latencies.append(time.perf_counter() - start)
            units += produced

    connections = [Connection(url) for _ in range(clients)]
    try:
        start = time.perf_counter()
        await asyncio.gather(*(client(c) for c in connections))
        seconds = time.perf_counter() - start
    finally:
        await asyncio.gather(*(c.aclose() for c in connections))
    return LoadResult(clients, seconds, latencies, failures, units)


# ------------------------------------------------------------------------------------------------------ server
class ServerProcess:
    """``vlkit serve`` in a child process on a free 127.0.0.1 port, as a user runs it: the load generator does not
    share its interpreter (nor its GIL). ``start()`` returns at once (two servers can load their models together);
    ``wait_ready()`` blocks until ``/health`` answers. A context manager does both, and stops it on exit."""

    def __init__(self, model: str | os.PathLike, *, max_batch: int, max_wait_ms: float, device: str = "auto",
                 env: dict[str, str] | None = None):  # fmt: skip
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [sys.executable, "-m", "vlkit", "serve", "--model", os.fspath(model), "--device", device,
                        "--port", str(self.port), "--max-batch", str(max_batch),
                        "--max-wait-ms", str(max_wait_ms)]  # fmt: skip
        # The bench's own server: no API key, whatever the shell has set for other servers.
        self.env = {k: v for k, v in {**os.environ, **(env or {})}.items() if k != "VLKIT_API_KEY"}
        self.process: subprocess.Popen | None = None

    def start(self) -> ServerProcess:
        # Its log goes to a file, not a pipe: nobody reads a pipe while the load runs, and a full one blocks the server.
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 (lives as long as the server)
        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=self._log, env=self.env)
        return self

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        import httpx

        assert self.process is not None, "start() first"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._log.seek(0)
                tail = self._log.read().decode(errors="replace").strip().splitlines()[-1:]
                raise UserError(f"vlkit serve exited with code {self.process.returncode}: {' '.join(tail)}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        self.close()
        raise UserError(f"vlkit serve did not answer /health within {timeout_s:.0f} s")

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def __enter__(self) -> ServerProcess:
        if self.process is None:
            self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
async def _post(client: Connection, path: str, body: dict) -> dict:
    response = await client.post(path, body)
    if response.status_code != 200:
        raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
    return response.json()


def embedding_sender(inputs: list[Any], model: str, out: dict[int, list[float]]) -> Send:
    """Request i embeds ``inputs[i % len(inputs)]``; its vector goes to ``out[i]``."""

    async def send(client: Connection, i: int) -> int:
        data = (await _post(client, "/v1/embeddings", {"model": model, "input": [inputs[i % len(inputs)]]}))["data"]
        if len(data) != 1:
            raise RuntimeError(f"{len(data)} embeddings for one input")
        out[i] = data[0]["embedding"]
        return 0

    return send


def chat_sender(images: list[str], model: str, max_tokens: int) -> Send:
    questions = ("What colour is the shape?", "What shape is it?", "Describe the image.")

    async def send(client: Connection, i: int) -> int:
        content = [{"type": "text", "text": questions[i % 3]},
                   {"type": "image_url", "image_url": {"url": images[i % len(images)]}}]  # fmt: skip
        body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                "temperature": 0}  # fmt: skip
        reply = await _post(client, "/v1/chat/completions", body)
        if reply["choices"][0]["message"]["role"] != "assistant":
            raise RuntimeError("no assistant message")
        return int(reply["usage"]["completion_tokens"])

    return send


def served_model(url: str) -> dict:
    """The served model's entry of ``/v1/models`` (its id names it in the requests)."""
    import httpx

    return httpx.get(url + "/v1/models", timeout=60).json()["data"][0]


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
        import fastapi  # noqa: F401
        import httpx  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise UserError(
            f"vlkit bench serve needs the serve extra and httpx ({e}): pip install 'vlkit[serve]' httpx"
        ) from None
    workload = args.workload or _kind(args.model)
    if (workload == "chat") != (_kind(args.model) == "chat"):
        raise UserError(f"--workload {workload} does not fit --model {args.model} ({_kind(args.model)} model)")
    if args.hf and workload != "chat":
        raise UserError("--hf is the chat workload's transformers baseline; embeddings have none")
    vectors: dict[str, dict[int, list[float]]] = {}
    if workload == "chat":
        images = sample_images(8, args.image_size)
    else:
        inputs = sample_texts(args.requests) if workload == "embed-text" else sample_images(64, args.image_size)
        if workload == "embed-image":
            inputs = [{"type": "image_url", "image_url": {"url": u}} for u in inputs]
        vectors = {"batched": {}, "one": {}}

    rows = {}
    for name, max_batch in (("batched", args.max_batch), ("one", 1)):
        wait_ms = args.max_wait_ms if max_batch > 1 else 0.0
        with ServerProcess(args.model, max_batch=max_batch, max_wait_ms=wait_ms, device=args.device) as server:
            models = served_model(server.url)
            if workload == "chat":
                send = chat_sender(images, models["id"], args.max_tokens)
            else:
                send = embedding_sender(inputs, models["id"], vectors[name])
            asyncio.run(run_load(server.url, send, args.clients, args.clients))  # warm-up: first forwards; not timed
            result = asyncio.run(run_load(server.url, send, args.requests, args.clients))
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
