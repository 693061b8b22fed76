"""The HTTP API of ``vlkit serve`` (FastAPI): OpenAI's chat completions and embeddings, classification, search over
an index, health, models, Prometheus metrics and the web page. :func:`create_app` builds it around a loaded
:class:`~vlkit.serve.models.ServedModel`; :class:`BackgroundServer` runs it with uvicorn in a thread (tests, bench).

Forward passes never run on the event loop: a NeVA decodes on its engine's thread, and CLIP / classifier batches run
on one worker thread (one forward at a time: concurrent forwards would only compete for the same cores), fed by
micro-batchers that merge the items of concurrent requests.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import json
import secrets
import socket
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Match

from vlkit.serve.batching import MicroBatcher
from vlkit.serve.errors import ERROR_CODE, ApiError, error_response, install_error_handlers, log
from vlkit.serve.metrics import Metrics
from vlkit.serve.models import CLASSIFIER, CLIP, NEVA, ServedModel
from vlkit.serve.requests import (
    ChatRequest,
    ClassifyRequest,
    EmbeddingRequest,
    ImagePart,
    ImagePolicy,
    SearchRequest,
    conversation,
    decode,
    header_pixels,
    image_bytes,
    load_image,
    stop_strings,
)
from vlkit.utils.errors import UserError

STATIC_DIR = Path(__file__).parent / "static"
DEFAULT_MAX_TOKENS = 128  # as `vlkit chat --max-new-tokens`; lowered to what the context leaves when not given
ZEROSHOT_TEMPLATES = "openai"  # the prompt templates of `vlkit predict`, so both give the same probabilities
CHAT_PATH = "/v1/chat/completions"
INLINE_DECODE_CHARS = 64_000  # data URLs up to this length (a ~48 kB image, decoded in about a millisecond)
INLINE_DECODE_PIXELS = 1_000_000  # ... unless it unpacks to more pixels (a flat 7000 x 7000 PNG is ~50 kB)
RASTER_TYPES = ("image/jpeg", "image/png", "image/webp", "image/gif", "image/bmp", "image/tiff")
LABEL_CACHE_LABELS = 10_000  # zero-shot labels whose classifier rows are kept (~30 MB at D = 768)
LABEL_SLICE = 32  # labels per forward-thread job when building rows (32 x 80 prompts)
OPEN_PATHS = ("/", "/health", "/static", "/favicon.ico")  # no API key needed: the page asks for it itself
# This request's count of the forward passes it is waiting on (set per HTTP request by _Guard): a mutable cell, so the
# tasks a request gathers (texts and images at once) share it.
_WAITS: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("vlkit_request_waits", default=None)


@dataclass(frozen=True)
class Settings:
    """The server's limits and options (``vlkit serve``'s command line)."""

    api_key: str | None = None
    allow_local_files: bool = False
    max_image_pixels: int = 50_000_000
    max_request_mb: float = 20.0
    max_batch: int = 32
    max_wait_ms: float = 5.0

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mb * 1024 * 1024)

    @property
    def image_policy(self) -> ImagePolicy:
        return ImagePolicy(self.max_image_pixels, self.allow_local_files)


class _Runtime:
    """What the endpoints share: the model, the batchers and their worker thread, the metrics."""

    def __init__(self, served: ServedModel, settings: Settings):
        self.served, self.settings, self.metrics = served, settings, Metrics()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="vlkit-forward")
        self.batchers: dict[str, MicroBatcher] = {}
        self._label_rows: OrderedDict[str, torch.Tensor] = OrderedDict()  # zero-shot classifier rows, LRU
        self._building: dict[str, asyncio.Future] = {}  # label -> the job building its row
        self.in_flight = 0  # HTTP requests being handled
        self.waiting = 0  # of them, those waiting on a forward pass (they cannot add items to a batch any more)

        def batcher(name: str, fn: Any) -> None:
            self.batchers[name] = MicroBatcher(fn, max_batch=settings.max_batch, max_wait_ms=settings.max_wait_ms,
                                               executor=self.executor, idle=self.no_request_can_join,
                                               on_batch=lambda n: self.metrics.batch_done(name, n))  # fmt: skip

        if served.encoder is not None:
            batcher("embed_text", lambda texts: list(served.encoder.embed_texts(texts)))
            batcher("embed_image", lambda images: list(served.encoder.embed_images(images)))
        if served.classifier is not None:
            batcher("classify", lambda images: list(served.classifier.probabilities(images)))
        self.metrics.gauges["vlkit_queue_depth:queue"] = self._queue_depths
        if served.engine is not None:
            self.metrics.gauges["vlkit_generation_active"] = lambda: {"": served.engine.stats()["active"]}
            self.metrics.gauges["vlkit_generation_batch_size_mean"] = self._generation_batch

    def no_request_can_join(self) -> bool:
        """Every request in the server waits on a forward pass already: a batch waiting for company would wait for
        a request not yet sent. (Under a steady load of N clients this closes each batch when all N have joined,
        instead of idling until ``--max-wait-ms``.)"""
        return self.in_flight <= self.waiting

    @contextlib.asynccontextmanager
    async def forward_wait(self) -> AsyncIterator[None]:
        """Counts this request as waiting on a forward pass while inside (once, however many it waits on)."""
        cell = _WAITS.get()
        if cell is None:  # not through _Guard (a direct call): nothing to count
            yield
            return
        cell[0] += 1
        self.waiting += cell[0] == 1
        try:
            yield
        finally:
            cell[0] -= 1
            self.waiting -= cell[0] == 0

    async def submit(self, queue: str, items: list[Any]) -> list[Any]:
        """The results of ``items`` from the micro-batcher ``queue``, batched with other requests' items."""
        if not items:
            return []
        async with self.forward_wait():
            return await self.batchers[queue].submit(items)

    def _queue_depths(self) -> dict[str, float]:
        depths = {name: b.depth for name, b in self.batchers.items()}
        if self.served.engine is not None:
            depths["generation"] = self.served.engine.stats()["queue_depth"]
        return depths

    def _generation_batch(self) -> dict[str, float]:
        sizes = self.served.engine.stats()["batch_sizes"]  # of the recent decode steps
        return {"": round(sum(sizes) / len(sizes), 3) if sizes else 0.0}

    async def start(self) -> None:
        for b in self.batchers.values():
            b.start()
        if self.served.engine is not None:
            self.served.engine.start()

    async def close(self) -> None:
        for b in self.batchers.values():
            await b.close()
        if self.served.engine is not None:
            await asyncio.to_thread(self.served.engine.close)
        self.executor.shutdown(wait=True, cancel_futures=True)

    async def label_matrix(self, labels: list[str]) -> torch.Tensor:
        """[L, D] zero-shot classifier of ``labels`` (OpenAI's templates, as `vlkit predict`). Each label's row is
        its own (the mean of its prompts' embeddings), so rows are cached per label whatever set they came in, built
        once when requests ask for the same new label together, and built LABEL_SLICE labels per forward-thread job,
        so that a request with many new labels does not hold the thread that every embedding waits on."""
        rows: dict[str, torch.Tensor] = {}
        jobs: dict[str, asyncio.Future] = {}
        new: list[str] = []
        for label in dict.fromkeys(labels):
            if label in self._label_rows:
                self._label_rows.move_to_end(label)
                rows[label] = self._label_rows[label]
            elif label in self._building:
                jobs[label] = self._building[label]
            else:
                new.append(label)
        for start in range(0, len(new), LABEL_SLICE):
            part = new[start : start + LABEL_SLICE]
            job = asyncio.ensure_future(self._build_rows(part))
            for label in part:
                self._building[label] = jobs[label] = job
        if jobs:
            async with self.forward_wait():
                for label, job in jobs.items():
                    rows[label] = (await asyncio.shield(job))[label]  # a client gone does not cancel shared work
        return torch.stack([rows[label] for label in labels])

    async def _build_rows(self, labels: list[str]) -> dict[str, torch.Tensor]:
        try:
            matrix = await asyncio.get_running_loop().run_in_executor(self.executor, self._build, labels)
            built = dict(zip(labels, matrix, strict=True))
            self._label_rows.update(built)
            while len(self._label_rows) > LABEL_CACHE_LABELS:
                self._label_rows.popitem(last=False)
            return built
        finally:
            for label in labels:
                self._building.pop(label, None)

    def _build(self, labels: list[str]) -> torch.Tensor:
        from vlkit.eval.templates import resolve_templates
        from vlkit.eval.zeroshot import build_classifier

        enc = self.served.encoder
        templates = resolve_templates(ZEROSHOT_TEMPLATES)[0]
        with torch.no_grad():
            return build_classifier(enc.model, labels, templates, enc.tokenizer, precision="fp32").float().cpu()


# ---------------------------------------------------------------------------------------------------------- checks


def _check_model(served: ServedModel, name: str | None, kinds: tuple[str, ...], what: str) -> None:
    """A request's ``model`` names the served model (or is omitted) and the model can do ``what``."""
    if name is not None and name not in served.names():
        raise ApiError(404, f"the model '{name}' does not exist; this server serves '{served.id}'", param="model",
                       code="model_not_found")  # fmt: skip
    if served.kind not in kinds:
        raise ApiError(400, f"the model '{served.id}' is a {served.kind} model: it does not serve {what}",
                       param="model", code="unsupported_model")  # fmt: skip


async def _image(url: str, settings: Settings, param: str) -> Any:
    """A decoded image. A large one is decoded off the event loop; a small one at once, which costs less than the
    hop to a thread."""
    policy = settings.image_policy
    if url.startswith("data:") and len(url) <= INLINE_DECODE_CHARS:
        data = image_bytes(url, policy, param)
        if header_pixels(data) <= INLINE_DECODE_PIXELS:
            return decode(data, policy, param)
        return await asyncio.to_thread(decode, data, policy, param)
    return await asyncio.to_thread(load_image, url, policy, param)


# ------------------------------------------------------------------------------------------------------------ chat


def _chunk(base: dict, delta: dict, finish_reason: str | None = None) -> str:
    body = {**base, "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}  # fmt: skip
    return f"data: {json.dumps(body)}\n\n"


def _usage(stream: Any) -> dict:
    return {"prompt_tokens": stream.prompt_tokens, "completion_tokens": stream.completion_tokens,
            "total_tokens": stream.prompt_tokens + stream.completion_tokens}  # fmt: skip


async def _events(rt: _Runtime, stream: Any, base: dict, include_usage: bool) -> AsyncIterator[str]:
    """The server-sent events of a streamed answer, in OpenAI's chunk shape; a client that goes away cancels the
    generation."""
    finished = False
    try:
        yield _chunk(base, {"role": "assistant", "content": ""})
        try:
            async for piece in stream:
                if piece.text:
                    yield _chunk(base, {"content": piece.text})
                if piece.finish_reason is not None:
                    yield _chunk(base, {}, piece.finish_reason)
        except Exception as e:  # noqa: BLE001 (headers are sent: the error goes in the stream, as OpenAI does)
            # The status (200) is counted already; the failure is logged and counted as an error of its own. Its
            # text reaches the client only for a user's error: a bug's stays in the log, as for a 500.
            log.exception("a streamed chat answer failed")
            rt.metrics.error_in_stream(CHAT_PATH, "generation_failed")
            message = str(e) if isinstance(e, UserError) else f"internal error ({type(e).__name__}); see the server log"
            error = {"message": message, "type": "server_error", "param": None, "code": "generation_failed"}
            yield f"data: {json.dumps({'error': error})}\n\n"
            finished = True
            return
        finished = True
        rt.metrics.tokens_generated(stream.completion_tokens)
        if include_usage:
            usage = {**base, "object": "chat.completion.chunk", "choices": [], "usage": _usage(stream)}
            yield f"data: {json.dumps(usage)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        if not finished:
            stream.cancel()


async def _until_disconnected(request: Request) -> None:
    """Return when the client has closed the connection. The body has been read, so the next ASGI message is
    ``http.disconnect`` (uvicorn sends it when the connection is lost or, at the latest, after the response)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _finished_unless_gone(stream: Any, request: Request) -> bool:
    """Consume a non-streamed answer; False, with its batch row freed, if the client goes away first. Starlette does
    not cancel a plain endpoint when its client disconnects, so without this the engine would generate for nobody."""

    async def drain() -> None:
        async for _ in stream:
            pass

    answer, gone = asyncio.ensure_future(drain()), asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait((answer, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this handler is cancelled (server shutdown)
        gone.cancel()
        if not answer.done():
            stream.cancel()
            answer.cancel()
    if not answer.done():  # the client went away first
        return False
    answer.result()  # an engine error is raised here
    return True


async def _chat(rt: _Runtime, body: ChatRequest, request: Request) -> Response:
    from vlkit.serve.generation import ChatJob, JobError, PromptTooLong

    served = rt.served
    _check_model(served, body.model, (NEVA,), "chat completions (it is not a chat model)")
    if body.n != 1:
        raise ApiError(400, "n: only n=1 is supported", param="n", code="invalid_value")
    conv = conversation(body.messages)
    image = await _image(conv.image_url, rt.settings, conv.image_param) if conv.image_url else None
    if image is not None and served.aspect == "pad" and max(image.size) ** 2 > rt.settings.max_image_pixels:
        side = max(image.size)  # LLaVA's expand2square: the canvas is made before the resize
        raise ApiError(400, f"the image is too large: this model pads {image.width}x{image.height} to a {side}x{side} "
                       f"square, more than this server's --max-image-pixels ({rt.settings.max_image_pixels})",
                       param=conv.image_param, code="image_too_large")  # fmt: skip
    max_tokens = body.max_completion_tokens or body.max_tokens
    job = ChatJob(conv.turns, image, conv.system, max_tokens or 1, body.temperature, body.top_p,
                  stop_strings(body.stop), body.seed)  # fmt: skip
    engine = served.engine
    try:
        if max_tokens is None:  # OpenAI's default: as long as the context allows, here up to DEFAULT_MAX_TOKENS
            job.max_tokens = max(1, min(DEFAULT_MAX_TOKENS, engine.context_length - engine.prompt_tokens(job)))
        stream = await asyncio.to_thread(engine.submit, job)  # transforms the image: off the event loop
    except PromptTooLong as e:
        raise ApiError(400, str(e), param="messages", code="context_length_exceeded") from None
    except JobError as e:
        raise ApiError(400, str(e), param="messages", code="invalid_value") from None
    base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": served.id,
            "system_fingerprint": None}  # fmt: skip
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_events(rt, stream, base, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})  # fmt: skip
    if not await _finished_unless_gone(stream, request):
        return Response(status_code=499)  # nobody reads it (nginx's "client closed request")
    rt.metrics.tokens_generated(stream.completion_tokens)
    message = {"role": "assistant", "content": stream.text, "refusal": None}
    return JSONResponse({**base, "object": "chat.completion", "usage": _usage(stream),
                         "choices": [{"index": 0, "message": message, "logprobs": None,
                                      "finish_reason": stream.finish_reason}]})  # fmt: skip


# ------------------------------------------------------------------------------------------- embeddings and search


async def _embeddings(rt: _Runtime, body: EmbeddingRequest) -> dict:
    served = rt.served
    _check_model(served, body.model, (CLIP,), "embeddings")
    inputs = [body.input] if isinstance(body.input, str) else body.input
    if not inputs:
        raise ApiError(400, "input: give a string, a list of strings or a list of image_url parts", param="input")
    texts = [(i, x) for i, x in enumerate(inputs) if isinstance(x, str)]
    parts = [(i, x) for i, x in enumerate(inputs) if isinstance(x, ImagePart)]
    images, pixels = [], 0
    for i, p in parts:  # one after the other: --max-image-pixels bounds the request's images together too
        images.append(await _image(p.image_url.url, rt.settings, f"input[{i}].image_url.url"))
        pixels += images[-1].width * images[-1].height
        if pixels > rt.settings.max_image_pixels:
            raise ApiError(400, f"the request's images have more than {rt.settings.max_image_pixels} pixels together "
                           "(--max-image-pixels); send them in several requests", param="input",
                           code="image_too_large")  # fmt: skip
    # Both finish before an error is raised, so no forward pass is left running for a request that has ended.
    text_vecs, image_vecs = await asyncio.gather(rt.submit("embed_text", [t for _, t in texts]),
                                                 rt.submit("embed_image", images), return_exceptions=True)  # fmt: skip
    for outcome in (text_vecs, image_vecs):
        if isinstance(outcome, BaseException):
            raise outcome
    vectors: list[Any] = [None] * len(inputs)
    for (i, _), v in zip(texts, text_vecs):
        vectors[i] = v
    for (i, _), v in zip(parts, image_vecs):
        vectors[i] = v

    def encode(v: torch.Tensor) -> Any:
        if body.encoding_format == "base64":  # OpenAI's: little-endian float32 bytes, base64
            return base64.b64encode(v.numpy().astype("<f4").tobytes()).decode("ascii")
        return v.tolist()

    tokens = await asyncio.to_thread(_count_tokens, served.encoder, [t for _, t in texts]) if texts else 0
    data = [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)]
    return {"object": "list", "model": served.id, "data": data,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}  # fmt: skip


def _count_tokens(encoder: Any, texts: list[str]) -> int:
    """Text tokens as the model sees them (start and end markers included; padding, id 0, not)."""
    return int((encoder.tokenizer(texts) != 0).sum())


def _top(probs: torch.Tensor, names: list[str], k: int) -> list[dict]:
    values, indices = probs.topk(min(k, len(names)))
    return [{"label": names[i], "index": i, "score": v} for i, v in zip(indices.tolist(), values.tolist())]


async def _classify(rt: _Runtime, body: ClassifyRequest) -> dict:
    served = rt.served
    _check_model(served, body.model, (CLIP, CLASSIFIER), "classification")
    if served.kind == CLASSIFIER and body.labels is not None:
        raise ApiError(400, f"the model '{served.id}' is a ViT classifier: its classes are fixed (see /v1/models); "
                       "labels are for CLIP models", param="labels", code="invalid_value")  # fmt: skip
    if served.kind == CLIP:
        labels = [label.strip() for label in body.labels or []]
        if not labels or any(not label for label in labels) or len(set(labels)) != len(labels):
            raise ApiError(400, "labels: a CLIP model classifies zero-shot among the labels you give: a list of "
                           "distinct, non-empty strings", param="labels", code="invalid_value")  # fmt: skip
    image = await _image(body.image, rt.settings, "image")
    if served.kind == CLASSIFIER:
        (probs,) = await rt.submit("classify", [image])
        return {"object": "list", "model": served.id, "data": _top(probs, served.classes, body.top_k)}
    matrix = await rt.label_matrix(labels)
    (vec,) = await rt.submit("embed_image", [image])
    probs = (served.encoder.logit_scale * vec @ matrix.T).softmax(dim=-1)
    return {"object": "list", "model": served.id, "data": _top(probs, labels, body.top_k)}


async def _search(rt: _Runtime, body: SearchRequest) -> dict:
    served = rt.served
    _check_model(served, body.model, (CLIP,), "search")
    index = served.index
    if index is None:
        raise ApiError(400, "this server has no index to search (start it with --index DIR, made by vlkit embed)",
                       code="no_index")  # fmt: skip
    if (body.query is None) == (body.image is None):
        raise ApiError(400, "give exactly one of query (a text) and image (a data URL)", param="query",
                       code="invalid_value")  # fmt: skip
    if body.query is not None:
        (vec,) = await rt.submit("embed_text", [body.query])
    else:
        (vec,) = await rt.submit("embed_image", [await _image(body.image, rt.settings, "image")])
    hits = (await asyncio.to_thread(index.search, vec[None], body.top_k))[0]
    data = []
    for rank, hit in enumerate(hits, 1):
        meta = index.meta(hit.row)
        data.append({"rank": rank, "row": hit.row, "score": hit.score, "path": meta.get("path"), "key": meta.get("key"),
                     "caption": meta.get("caption"), "image_url": f"/v1/index/items/{hit.row}/image"})  # fmt: skip
    return {"object": "list", "model": served.id, "data": data}


def _index_image(rt: _Runtime, row: int) -> Response:
    if rt.served.index is None:
        raise ApiError(404, "this server has no index (start it with --index DIR)", code="no_index")
    try:
        data, mime = rt.served.index.image_bytes(row)
    except (KeyError, IndexError, UserError) as e:
        raise ApiError(404, str(e).strip("'\""), param="row", code="not_found") from None
    if mime not in RASTER_TYPES:  # an .svg or .html in the indexed folder would run in the page's origin
        raise ApiError(404, f"index row {row} is not a raster image ({mime})", param="row", code="not_found")
    headers = {"Cache-Control": "max-age=3600", "X-Content-Type-Options": "nosniff"}
    return Response(data, media_type=mime, headers=headers)


# ------------------------------------------------------------------------------------------------------------- app


def _models(served: ServedModel) -> dict:
    index = served.index
    return {"object": "list", "data": [{
        "id": served.id, "object": "model", "created": served.created, "owned_by": "vlkit", "kind": served.kind,
        "index": {"items": len(index), "dim": index.dim} if index is not None else None, "classes": served.classes,
    }]}  # fmt: skip


class _Guard:
    """ASGI middleware around the whole app: the API key, the request size limit (from Content-Length, and while
    the body is read, for chunked uploads) and the per-request metrics."""

    def __init__(self, app: Any, fastapi_app: FastAPI, rt: _Runtime):
        self.app, self.routes, self.rt = app, fastapi_app.routes, rt

    def _endpoint(self, scope: dict) -> str:
        for route in self.routes:  # the route's template, so that /v1/index/items/{row}/image is one label
            if route.matches(scope)[0] == Match.FULL:
                return getattr(route, "path", "other")
        return "other"

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, started = time.perf_counter(), [False]
        endpoint = self._endpoint(scope)
        code: list[str | None] = [None]  # set by error_response when the answer is an error

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                started[0] = True
                self.rt.metrics.request_done(endpoint, message["status"], time.perf_counter() - start, code[0])
            await send(message)

        code_token = ERROR_CODE.set(code)
        try:
            await self._serve(scope, receive, send_status, started, endpoint, start)
        finally:
            ERROR_CODE.reset(code_token)

    async def _serve(self, scope: dict, receive: Any, send_status: Any, started: list, endpoint: str,
                     start: float) -> None:  # fmt: skip
        refusal = self._refusal(scope)
        if refusal is not None:
            return await refusal(scope, receive, send_status)
        limit, seen = self.rt.settings.max_request_bytes, [0]

        async def receive_limited() -> dict:
            message = await receive()
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > limit:
                    raise ApiError(413, f"the request body is over this server's limit of "
                                   f"{self.rt.settings.max_request_mb:g} MB (--max-request-mb)",
                                   code="request_too_large")  # fmt: skip
            return message

        self.rt.in_flight += 1
        token = _WAITS.set([0])
        try:
            await self.app(scope, receive_limited, send_status)
        except Exception:  # a bug: Starlette's outer middleware answers 500; count it here, where metrics are
            if not started[0]:
                self.rt.metrics.request_done(endpoint, 500, time.perf_counter() - start, "internal_error")
            raise
        finally:
            _WAITS.reset(token)
            self.rt.in_flight -= 1

    def _refusal(self, scope: dict) -> Response | None:
        settings = self.rt.settings
        path = scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        open_path = path == "/" or any(path == p or path.startswith(p + "/") for p in OPEN_PATHS[1:])
        if settings.api_key and not open_path:
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(),
                                                                        settings.api_key.encode()):  # fmt: skip
                return error_response(401, "missing or incorrect API key: send the header 'Authorization: Bearer "
                                      "<key>'", code="invalid_api_key")  # fmt: skip
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > settings.max_request_bytes:
            return error_response(413, f"the request body ({int(length) / 2**20:.1f} MB) is over this server's limit "
                                  f"of {settings.max_request_mb:g} MB (--max-request-mb)",
                                  code="request_too_large")  # fmt: skip
        return None


def create_app(served: ServedModel, settings: Settings | None = None) -> FastAPI:
    """The FastAPI app serving ``served`` (see the module docstring). Its startup starts the batchers and the
    generation engine; its shutdown stops them."""
    settings = settings or Settings()
    rt = _Runtime(served, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await rt.start()
        try:
            yield
        finally:
            await rt.close()

    app = FastAPI(title="vlkit serve", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.runtime = rt
    install_error_handlers(app)

    # Handlers return responses, not dicts: FastAPI would validate and re-encode a dict field by field (a
    # measurable cost per embedding request).
    @app.get("/health")
    async def health() -> Response:
        return JSONResponse({"status": "ok", "model": served.id, "kind": served.kind})

    @app.get("/v1/models")
    async def models() -> Response:
        return JSONResponse(_models(served))

    @app.post(CHAT_PATH)
    async def chat(body: ChatRequest, request: Request) -> Response:
        return await _chat(rt, body, request)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest) -> Response:
        return JSONResponse(await _embeddings(rt, body))

    @app.post("/v1/classify")
    async def classify(body: ClassifyRequest) -> Response:
        return JSONResponse(await _classify(rt, body))

    @app.post("/v1/search")
    async def search(body: SearchRequest) -> Response:
        return JSONResponse(await _search(rt, body))

    @app.get("/v1/index/items/{row}/image")
    async def index_image(row: int) -> Response:
        return await asyncio.to_thread(_index_image, rt, row)

    @app.get("/metrics")
    async def metrics() -> Response:
        return PlainTextResponse(rt.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/")
    async def page() -> Response:
        if (STATIC_DIR / "index.html").is_file():
            return FileResponse(STATIC_DIR / "index.html")
        return PlainTextResponse(f"vlkit serve: {served.kind} model '{served.id}'. The web page is not installed "
                                 f"({STATIC_DIR}/index.html is missing); the API is under /v1 (see /docs)")  # fmt: skip

    if STATIC_DIR.is_dir():
        from fastapi.staticfiles import StaticFiles

        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_middleware(_Guard, fastapi_app=app, rt=rt)
    return app


class BackgroundServer:
    """``app`` served by uvicorn on a thread of this process, on ``host`` and a free port (tests, benchmarks).

    Use as a context manager; :attr:`url` is ``http://host:port``.
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()
