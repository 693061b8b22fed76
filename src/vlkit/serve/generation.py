"""NeVA chat generation for the server: concurrent conversations share forward passes (continuous batching).

One background thread owns the model. Each loop turn is a step boundary:

1. admit: each waiting request (up to ``max_batch`` rows in all) is prefilled alone (its spliced prompt through the
   LLM into a KV cache of its own), then its cache joins the running batch's: the batch stays left-padded, so the
   shorter caches are shifted right and the attention mask marks the padding. Positions come from the mask
   (:mod:`vlkit.models.llama`), so every row keeps the positions it would have alone;
2. choose: every row picks its next token from its own logits, with its own settings and random generator;
3. finish: rows that produced an end marker, completed a stop string or reached ``max_tokens`` leave the batch (their
   cache rows are dropped, and padding columns no row needs any more are cut);
4. decode: one forward pass of the remaining rows' new tokens, all rows together.

A row therefore computes what :meth:`vlkit.eval.vqa.Assistant.answer` computes for the same conversation alone
(greedy answers are equal whatever else is being generated), and a seeded row samples from a generator of its own,
as ``answer(..., seed=...)`` does for a batch of one.

Usage counts: ``prompt_tokens`` is the prompt's length as the model sees it, every image counted as the
``num_image_tokens`` positions its features take (what the context limit applies to, and how OpenAI counts image
input); ``completion_tokens`` counts the generated tokens, the end marker included.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from vlkit.data.conversation import IMAGE_TOKEN, Turn
from vlkit.utils.errors import UserError

RECENT_STEPS = 256  # decode-step batch sizes kept for stats()
CANCELLED = "cancelled"  # the finish reason of a cancelled stream (nobody reads it: its client is gone)
MIN_TEMPERATURE = 1e-4  # a lower temperature samples as greedy does (dividing logits by 1e-45 overflows to inf)
_REPLACEMENT = "\ufffd"  # what a byte-level tokenizer decodes an incomplete UTF-8 character to


@dataclass
class ChatJob:
    """One chat completion: ``turns`` end with the human turn to answer; ``<image>`` in the first human turn marks
    where ``image`` goes. ``temperature`` 0 is greedy."""

    turns: list[Turn]
    image: Any | None  # PIL image
    system: str | None = None
    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


class JobError(UserError, ValueError):
    """A chat request the engine cannot run (bad settings, an image placeholder without an image, ...)."""


class PromptTooLong(JobError):
    """The prompt plus ``max_tokens`` do not fit the model's context."""


class EngineClosed(RuntimeError):
    """The engine stopped before (or while) generating the request."""


@dataclass
class Chunk:
    """New answer text since the previous chunk; ``finish_reason`` is set on the last one only."""

    text: str
    finish_reason: str | None = None


class ChatStream:
    """The chunks of one request as the engine produces them: ``for chunk in stream`` or ``async for chunk in
    stream`` (one consumer). An error inside the engine is raised from the iteration. After the last chunk,
    ``text``, ``finish_reason`` and ``completion_tokens`` hold the whole answer."""

    def __init__(self, prompt_tokens: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.text = ""
        self.finish_reason: str | None = None
        self.cancelled = False
        self._items: deque[Chunk | BaseException] = deque()
        self._ready = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self._ended = False

    def cancel(self) -> None:
        """Stop generating (the client went away): the row leaves the batch at the next step, and the stream ends
        with finish reason ``cancelled``. An ``async for`` that is itself cancelled cancels the stream."""
        self.cancelled = True

    # -- the engine's side ---------------------------------------------------------------------------------------------
    def _put(self, item: Chunk | BaseException) -> None:
        with self._ready:
            self._items.append(item)
            self._ready.notify_all()
            loop, wakeup = self._loop, self._wakeup
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the consumer's event loop is gone: nobody is listening
                loop.call_soon_threadsafe(wakeup.set)

    def _finish(self, text: str, reason: str, completion_tokens: int) -> None:
        self.text, self.completion_tokens = text, completion_tokens
        self.finish_reason = reason

    # -- the consumer's side -------------------------------------------------------------------------------------------
    def _next(self) -> Chunk | BaseException | None:
        """The next item if one is there, else None."""
        with self._ready:
            return self._items.popleft() if self._items else None

    def _deliver(self, item: Chunk | BaseException) -> Chunk:
        if isinstance(item, BaseException):
            self._ended = True
            raise item
        if item.finish_reason is not None:
            self._ended = True
        return item

    def __iter__(self) -> Iterator[Chunk]:
        while not self._ended:
            with self._ready:
                while not self._items:
                    self._ready.wait()
                item = self._items.popleft()
            yield self._deliver(item)

    def __aiter__(self) -> AsyncIterator[Chunk]:
        with self._ready:
            self._loop = asyncio.get_running_loop()
            self._wakeup = asyncio.Event()
        return self

    async def __anext__(self) -> Chunk:
        if self._ended:
            raise StopAsyncIteration
        while True:
            self._wakeup.clear()  # before looking: a chunk put after the look sets it again
            item = self._next()
            if item is not None:
                return self._deliver(item)
            try:
                await self._wakeup.wait()
            except asyncio.CancelledError:  # the consumer (an HTTP client) is gone: free the row
                self.cancel()
                raise


# ------------------------------------------------------------------------------------------------------ text output
def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters of ``text`` could be the start of a stop string."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return hold


def visible_text(text: str, stops: tuple[str, ...]) -> str:
    """The part of a still-growing answer that is certain to be in the final (stripped) answer: no suffix that could
    begin a stop string, no trailing whitespace (stripped if nothing follows) nor incomplete character."""
    # The incomplete character goes first: what comes before it may itself begin a stop string ("用" of "用户：").
    text = text.rstrip(_REPLACEMENT)
    text = text[: len(text) - _held_back(text, stops)]
    return text.rstrip().rstrip(_REPLACEMENT).rstrip().lstrip()


# ------------------------------------------------------------------------------------------------------------- rows
@dataclass(eq=False)  # compared by identity (they hold tensors)
class _Request:
    job: ChatJob
    prompt: list[int]  # token ids, IMAGE_TOKEN_INDEX where the image goes
    pixels: torch.Tensor  # [1, 3, H, W] (zeros without an image)
    stream: ChatStream


@dataclass(eq=False)
class _Row:
    """A request being generated: its sampling state, tokens so far and what its stream has been sent."""

    request: _Request
    stops: tuple[str, ...]
    generator: torch.Generator | None
    logits: torch.Tensor | None = None  # [vocab] of the next token (set by prefill and each decode step)
    tokens: list[int] = field(default_factory=list)
    sent: str = ""

    @property
    def job(self) -> ChatJob:
        return self.request.job

    @property
    def stream(self) -> ChatStream:
        return self.request.stream


def _repack(
    parts: list[tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]], spare: int
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Stack caches right-aligned: each part is (per-layer (k, v) [b, KV, len, d], mask [b, len]); the result is
    left-padded to the longest real span (columns no row uses are dropped) with ``spare`` free positions after it."""
    trimmed = []
    for layers, mask in parts:
        used = mask.any(0).nonzero()
        start = int(used[0]) if len(used) else mask.shape[1]  # drop leading columns that are padding in every row
        trimmed.append(([(k[:, :, start:], v[:, :, start:]) for k, v in layers], mask[:, start:]))
    width = max(mask.shape[1] for _, mask in trimmed)
    rows = sum(mask.shape[0] for _, mask in trimmed)
    first_layers, first_mask = trimmed[0]
    out_mask = first_mask.new_zeros(rows, width)
    out_layers = []
    for k0, v0 in first_layers:
        b, heads, _, d = k0.shape
        out_layers.append((k0.new_zeros(rows, heads, width + spare, d), v0.new_zeros(rows, heads, width + spare, d)))
    row = 0
    for layers, mask in trimmed:
        n, length = mask.shape
        span = slice(width - length, width)
        out_mask[row : row + n, span] = mask
        for (k_out, v_out), (k, v) in zip(out_layers, layers):
            k_out[row : row + n, :, span] = k
            v_out[row : row + n, :, span] = v
        row += n
    return out_layers, out_mask


def _cache_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The filled part of every layer of a :class:`vlkit.nn.KVCache`."""
    return [(layer.k[:, :, : layer.length], layer.v[:, :, : layer.length]) for layer in cache.layers]


def _make_cache(model, layers: list[tuple[torch.Tensor, torch.Tensor]], length: int):
    """A KVCache over ready buffers (each [B, KV, capacity, d]) holding ``length`` positions."""
    cache = model.new_kv_cache(layers[0][0].shape[2])
    for slot, (k, v) in zip(cache.layers, layers):
        slot.k, slot.v, slot.length = k, v, length
    return cache


# ----------------------------------------------------------------------------------------------------------- engine
class GenerationEngine:
    """Batched, streamed NeVA chat generation on a background thread (see the module docstring).

    Args:
        assistant: a :class:`vlkit.eval.vqa.Assistant` (:func:`vlkit.eval.vqa.load_assistant`); its device and
            autocast dtype are used.
        max_batch: the most conversations decoded together; more wait for a row to free up.
        model_id: the name the server gives the model.
    """

    def __init__(self, assistant, max_batch: int = 8, model_id: str = "neva") -> None:
        from vlkit.utils.modules import model_device

        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch} must be >= 1")
        self.assistant = assistant
        self.inner = assistant.inner
        self.device = model_device(self.inner)
        self.max_batch = max_batch
        self.model_id = model_id
        self.context_length = int(self.inner.config.llm.encoder_seq_length)
        self._eos = assistant.eos_token_ids()
        self._waiting: deque[_Request] = deque()
        self._rows: list[_Row] = []
        self._cache = None
        self._mask: torch.Tensor | None = None
        self._wake = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._generated = 0
        self._steps = 0
        self._batch_sizes: deque[int] = deque(maxlen=RECENT_STEPS)

    # -- lifecycle -----------------------------------------------------------------------------------------------------
    def start(self) -> GenerationEngine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="vlkit-generation", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop the loop; requests still waiting or running end with :class:`EngineClosed`."""
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join()
        self._end_all(EngineClosed("the generation engine was shut down"))

    def _end_all(self, error: Exception) -> None:
        """End every waiting and running request with ``error`` and empty the batch (the loop is not running)."""
        for request in [*self._waiting, *(row.request for row in self._rows)]:
            request.stream._put(error)
        self._waiting.clear()
        self._rows, self._cache, self._mask = [], None, None

    def __enter__(self) -> GenerationEngine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- requests ------------------------------------------------------------------------------------------------------
    def _check(self, job: ChatJob) -> list[int]:
        """The prompt's ids after validating the job (raises JobError / PromptTooLong)."""
        from vlkit.models.neva import IMAGE_TOKEN_INDEX

        if job.max_tokens < 1:
            raise JobError(f"max_tokens={job.max_tokens} must be at least 1")
        if job.temperature < 0:
            raise JobError(f"temperature={job.temperature} must be >= 0")
        if not 0.0 < job.top_p <= 1.0:
            raise JobError(f"top_p={job.top_p} must be in (0, 1]")
        if any(not s for s in job.stop):
            raise JobError("stop strings must not be empty")
        try:
            prompt = self.assistant.chat.prompt(list(job.turns), system=job.system)
        except ValueError as e:
            raise JobError(str(e)) from None
        images = prompt.count(IMAGE_TOKEN_INDEX)
        if images > 1:
            raise JobError(f"the conversation has {images} {IMAGE_TOKEN} placeholders; one image is supported")
        if images and job.image is None:
            raise JobError(f"the conversation has an {IMAGE_TOKEN} placeholder but no image")
        length = self._spliced_length(prompt)
        if length + job.max_tokens > self.context_length:
            raise PromptTooLong(
                f"the prompt takes {length} tokens and max_tokens is {job.max_tokens}: {length + job.max_tokens} "
                f"exceed the model's context of {self.context_length} tokens"
            )
        return prompt

    def _spliced_length(self, prompt: list[int]) -> int:
        from vlkit.models.neva import IMAGE_TOKEN_INDEX

        return len(prompt) + prompt.count(IMAGE_TOKEN_INDEX) * (self.inner.num_image_tokens - 1)

    def prompt_tokens(self, job: ChatJob) -> int:
        """The prompt's length as the model sees it (each image as its ``num_image_tokens``); validates the job."""
        return self._spliced_length(self._check(job))

    def submit(self, job: ChatJob) -> ChatStream:
        """Queue a job; returns its stream at once. Raises JobError / PromptTooLong (nothing queued) or
        EngineClosed."""
        from vlkit.models.neva import IMAGE_TOKEN_INDEX

        prompt = self._check(job)
        vision = self.inner.config.vision
        pixels = torch.zeros(1, 3, vision.img_h, vision.img_w)
        if IMAGE_TOKEN_INDEX in prompt:
            pixels[0] = self.assistant.image_tensor(job.image)  # here, on the caller's thread, not the model's
        stream = ChatStream(self._spliced_length(prompt))
        with self._wake:
            if self._closed:
                raise EngineClosed("the generation engine was shut down")
            self._waiting.append(_Request(job, prompt, pixels, stream))
            self._wake.notify_all()
        return stream

    def stats(self) -> dict:
        return {
            "queue_depth": len(self._waiting),
            "active": len(self._rows),
            "generated_tokens": self._generated,
            "batch_sizes": list(self._batch_sizes),
            "steps": self._steps,
        }

    # -- the loop ------------------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            self._serve()
        finally:  # the thread died (a BaseException): refuse new work and end what waits, instead of hanging it
            with self._wake:
                died, self._closed = not self._closed, True
            if died:
                self._end_all(EngineClosed("the generation engine stopped on an internal error (see the server log)"))

    def _serve(self) -> None:
        from vlkit.eval.runtime import autocast, register_forward_methods

        register_forward_methods(self.inner, ["prepare_inputs_embeds"])
        while True:
            with self._wake:
                while not self._closed and not self._waiting and not self._rows:
                    self._wake.wait()
                if self._closed:
                    return
                for request in [r for r in self._waiting if r.stream.cancelled]:  # gone before it got a row
                    self._waiting.remove(request)
                    request.stream._put(Chunk("", CANCELLED))
                room = self.max_batch - len(self._rows)
                admitted = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
            with torch.no_grad(), autocast(self.device, self.assistant.dtype):
                try:
                    self._admit(admitted)
                    self._choose_and_finish()
                    if self._rows:
                        self._decode()
                except Exception as e:  # noqa: BLE001 - the batch's requests fail, the engine goes on serving
                    self._fail_all(e)

    def _admit(self, requests: list[_Request]) -> None:
        """Prefill each request alone, then merge their caches into the batch's in one copy. A failing prefill fails
        its own request only."""
        rows, parts = [], []
        for request in requests:
            if request.stream.cancelled:
                request.stream._put(Chunk("", CANCELLED))
                continue
            try:
                row, cache, mask = self._prefill(request)
            except Exception as e:  # noqa: BLE001 - this request fails, the others go on
                request.stream._put(e)
                continue
            rows.append(row)
            parts.append((_cache_tensors(cache), mask))
        if not rows:
            return
        joining = rows
        if self._rows:
            rows, parts = [*self._rows, *rows], [(_cache_tensors(self._cache), self._mask), *parts]
        try:
            self._set_batch(rows, parts)
        except Exception as e:  # noqa: BLE001 - the newcomers fail; the running batch is untouched and goes on
            for row in joining:
                row.stream._put(e)

    def _prefill(self, request: _Request) -> tuple[_Row, Any, torch.Tensor]:
        """The request's spliced prompt through the model, as Assistant.answer runs it: (row, cache, mask)."""
        job = request.job
        ids = torch.tensor([request.prompt], dtype=torch.long, device=self.device)
        # No image, no vision tower: the engine runs alone (no DDP peer needs the dummy image Assistant.answer encodes,
        # whose features only enter as + 0 * sum).
        pixels = request.pixels.to(self.device) if request.job.image is not None else None
        s = self.inner.prepare_inputs_embeds(ids, pixels, torch.ones_like(ids), padding_side="left")
        cache = self.inner.new_kv_cache(s.inputs_embeds.shape[1])  # the prompt only: it is repacked into the batch
        logits = self.inner(inputs_embeds=s.inputs_embeds, kv_cache=cache, logits_to_keep=1)[0, -1]
        generator = None
        if job.temperature >= MIN_TEMPERATURE:  # a generator per row: a seeded answer does not depend on its mates
            generator = torch.Generator(device=self.device)
            if job.seed is None:
                generator.seed()
            else:
                generator.manual_seed(job.seed)
        stops = tuple(dict.fromkeys((*self.assistant.stop_strings, *job.stop)))
        return _Row(request, stops, generator, logits), cache, s.attention_mask.long()

    def _set_batch(self, rows: list[_Row], parts) -> None:
        # Room until the batch changes: the cache grows by one position per decode step, and the row with the fewest
        # tokens left leaves (a repack, sized anew) after at most that many steps; so do joins and early ends.
        spare = min(row.job.max_tokens - len(row.tokens) for row in rows)
        layers, mask = _repack(parts, spare)
        self._cache = _make_cache(self.inner, layers, mask.shape[1])
        self._mask, self._rows = mask, rows

    def _pick(self, row: _Row) -> int:
        """The row's next token from its logits, as generate() picks it for a batch of one."""
        from vlkit.models.generate import process_logits

        job = row.job
        sampling = job.temperature >= MIN_TEMPERATURE
        scores = process_logits(
            row.logits[None].float(),
            torch.zeros(1, 0, dtype=torch.long, device=self.device),  # no repetition penalty: no history needed
            None,
            do_sample=sampling,
            temperature=job.temperature if sampling else 1.0,
            top_k=0,
            top_p=job.top_p,
            repetition_penalty=1.0,
        )
        if sampling:
            return int(torch.multinomial(scores.softmax(dim=-1), 1, generator=row.generator))
        return int(scores.argmax(dim=-1))

    def _choose_and_finish(self) -> None:
        """Every row picks its next token; finished and cancelled rows stream their end and leave the batch."""
        from vlkit.models.generate import trim_at_stop

        keep: list[int] = []  # batch indices of the rows that go on
        for index, row in enumerate(self._rows):
            job = row.job
            if row.stream.cancelled:
                row.stream._finish(row.sent, CANCELLED, len(row.tokens))
                row.stream._put(Chunk("", CANCELLED))
                continue
            try:
                token = self._pick(row)
            except Exception as e:  # noqa: BLE001 - this row's logits or settings: it fails alone and leaves
                row.stream._put(e)
                continue
            row.tokens.append(token)
            self._generated += 1
            reason = None
            if token in self._eos:
                reason, text = "stop", self.assistant.decode(row.tokens[:-1])
            else:
                text = self.assistant.decode(row.tokens)
                if any(s in text for s in row.stops):
                    reason = "stop"
                elif len(row.tokens) >= job.max_tokens:
                    reason = "length"
            if reason is None:
                shown = visible_text(text, row.stops)
                if len(shown) > len(row.sent) and shown.startswith(row.sent):
                    row.stream._put(Chunk(shown[len(row.sent) :]))
                    row.sent = shown
                keep.append(index)
                continue
            final = trim_at_stop(text, row.stops).strip()
            row.stream._finish(final, reason, len(row.tokens))
            # The chunks add up to the answer as long as decoding more tokens never rewrites earlier text (true of
            # byte-level BPE and SentencePiece once a character is complete); otherwise the rest is dropped.
            row.stream._put(Chunk(final[len(row.sent) :] if final.startswith(row.sent) else "", reason))
        if len(keep) < len(self._rows):
            if keep:
                index = torch.tensor(keep, device=self.device)
                layers = [(k[index], v[index]) for k, v in _cache_tensors(self._cache)]
                self._set_batch([self._rows[i] for i in keep], [(layers, self._mask[index])])
            else:
                self._rows, self._cache, self._mask = [], None, None

    def _decode(self) -> None:
        """One forward pass of every row's newest token."""
        tokens = torch.tensor([[row.tokens[-1]] for row in self._rows], dtype=torch.long, device=self.device)
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(self._rows), 1)], dim=1)
        # As generate(): no mask when nothing is padded (SDPA's fastest path, and the same numbers as a lone row).
        mask = None if bool(self._mask.all()) else self._mask
        logits = self.inner(input_ids=tokens, attention_mask=mask, kv_cache=self._cache, logits_to_keep=1)[:, -1]
        for row, row_logits in zip(self._rows, logits):
            row.logits = row_logits
        self._steps += 1
        self._batch_sizes.append(len(self._rows))

    def _fail_all(self, error: Exception) -> None:
        for row in self._rows:
            row.stream._put(error)
        self._rows, self._cache, self._mask = [], None, None
