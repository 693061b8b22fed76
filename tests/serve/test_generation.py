"""The NeVA generation engine: concurrent requests batched together give what Assistant.answer gives for each alone
(greedy and seeded sampling), a request joins a running batch, streamed chunks add up to the answer without leaking
a stop string, usage counts, prompts over the context are refused before queueing, a failing step fails its streams
only, and close() ends what is left."""

import asyncio
import threading

import pytest
import torch
from PIL import Image

from vlkit.data.conversation import HUMAN, IMAGE_TOKEN, Turn
from vlkit.serve.generation import ChatJob, EngineClosed, GenerationEngine, PromptTooLong, visible_text

pytestmark = pytest.mark.usefixtures("one_thread")

COLOURS = [(220, 30, 30), (30, 200, 40), (30, 40, 220), (240, 230, 20), (0, 0, 0)]


@pytest.fixture(scope="module")
def assistant(neva_run):
    from vlkit.eval.vqa import load_assistant

    return load_assistant(str(neva_run), device="cpu")[0]


@pytest.fixture
def engine(assistant):
    with GenerationEngine(assistant, max_batch=8) as eng:
        yield eng


def job(question: str, colour=None, **settings) -> ChatJob:
    image = None if colour is None else Image.new("RGB", (48, 48), colour)
    text = question if image is None else f"{IMAGE_TOKEN}\n{question}"
    return ChatJob([Turn(HUMAN, text)], image, **settings)


def reference(assistant, j: ChatJob):
    return assistant.answer([j.turns], [j.image], systems=[j.system], max_new_tokens=j.max_tokens,
                            temperature=j.temperature, top_p=j.top_p, seed=j.seed)[0]  # fmt: skip


def collect(stream):
    chunks = list(stream)
    assert all(c.finish_reason is None for c in chunks[:-1]) and chunks[-1].finish_reason == stream.finish_reason
    assert "".join(c.text for c in chunks) == stream.text
    return chunks


# A mix: images and text-only, short and long prompts, greedy and seeded sampling, different max_tokens.
MIX = [
    dict(question="What colour is the shape?", colour=COLOURS[0], max_tokens=6),
    dict(question="Describe every shape in the picture, its colour and where it is, in detail.", colour=COLOURS[1],
         max_tokens=12),
    dict(question="Hi", max_tokens=9),
    dict(question="What shape is it?", colour=COLOURS[2], max_tokens=16, temperature=1.0, seed=7),
    dict(question="Count them.", colour=COLOURS[3], max_tokens=10, temperature=0.8, top_p=0.9, seed=3),
]  # fmt: skip


@pytest.mark.parametrize("max_batch", [8, 2])
def test_concurrent_requests_answer_as_each_alone(assistant, max_batch):
    engine = GenerationEngine(assistant, max_batch=max_batch)
    jobs = [job(**m) for m in MIX]
    streams = [engine.submit(j) for j in jobs]
    engine.start()  # all queued: they share decode steps (max_batch rows at most; the rest join as rows finish)
    for j, stream in zip(jobs, streams):
        collect(stream)
        ref = reference(assistant, j)
        assert stream.text == ref.text
        assert stream.finish_reason == ("length" if ref.finish_reason == "length" else "stop")
        # The end marker counts as a generated token (Answer.tokens leaves it out).
        assert stream.completion_tokens == len(ref.tokens) + (ref.finish_reason == "eos")
    stats = engine.stats()
    engine.close()
    # The first decode step runs every admitted row that did not end on its first token.
    decoded = sum(s.completion_tokens > 1 for s in streams[:max_batch])
    assert stats["batch_sizes"][0] == decoded == max(stats["batch_sizes"]) and decoded >= 2
    assert stats["active"] == 0 and stats["queue_depth"] == 0
    assert stats["generated_tokens"] == sum(s.completion_tokens for s in streams)


def test_seeded_sampling_does_not_depend_on_batch_mates(engine):
    lone = job("What shape is it?", COLOURS[4], max_tokens=12, temperature=1.2, seed=11)
    alone = engine.submit(lone)
    collect(alone)
    others = [engine.submit(job(**m)) for m in MIX[:3]]
    again = engine.submit(lone)
    more = [engine.submit(job(**m)) for m in MIX[3:]]
    collect(again)
    for s in others + more:
        collect(s)
    assert again.text == alone.text and again.completion_tokens == alone.completion_tokens


def test_a_request_joins_a_running_batch(assistant, engine):
    decoding, submitted = threading.Event(), threading.Event()

    def hold(module, args):  # the first decode step waits until the late request is queued
        if args[0] is not None and not decoding.is_set():
            decoding.set()
            submitted.wait(timeout=30)

    long = job("What shape is it?", COLOURS[2], max_tokens=24, temperature=1.0, seed=7)
    hook = assistant.inner.llm.register_forward_pre_hook(hold)
    try:
        first = engine.submit(long)
        decoding.wait(timeout=30)
        late = job("What colour is the shape?", COLOURS[0], max_tokens=6)
        second = engine.submit(late)
        submitted.set()
        collect(first)
        collect(second)
    finally:
        hook.remove()
    sizes = engine.stats()["batch_sizes"]
    assert sizes[0] == 1 and sizes[1] == 2  # the late request joined after the first step, not after the answer
    assert first.completion_tokens > 2
    assert first.text == reference(assistant, long).text and second.text == reference(assistant, late).text


def test_stop_string_ends_the_answer_and_never_streams(assistant, engine):
    sampled = job("What shape is it?", COLOURS[2], max_tokens=16, temperature=1.0, seed=7)
    full = reference(assistant, sampled).text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    sampled.stop = [stop]
    stream = engine.submit(sampled)
    chunks = collect(stream)
    assert stream.finish_reason == "stop" and stream.text == full[: full.find(stop)].strip()
    assert stream.completion_tokens < 16
    streamed = ""
    for c in chunks:  # no prefix of the stream ever held the stop string
        streamed += c.text
        assert stop not in streamed


def test_visible_text_holds_back_what_may_start_a_stop_string():
    stops = ("</s>", "###")
    assert visible_text(" red square</", stops) == "red square"
    assert visible_text("red #", stops) == "red"
    assert visible_text("a < b", stops) == "a < b"  # "<" followed by a space cannot become "</s>"
    assert visible_text("red \ufffd", stops) == "red"  # half a character
    # The half character goes first: what precedes it may begin a stop string ("用" of "用户：").
    assert visible_text("foo用\ufffd", ("用户：",)) == "foo"


def test_length_finish_and_usage(assistant, engine):
    j = job("What shape is it?", COLOURS[2], max_tokens=5, temperature=1.0, seed=7)
    stream = engine.submit(j)
    collect(stream)
    assert stream.finish_reason == "length" and stream.completion_tokens == 5
    # Prompt tokens as the model sees them: the placeholder becomes the image's positions.
    ids = assistant.chat.prompt(j.turns)
    assert stream.prompt_tokens == len(ids) - 1 + assistant.inner.num_image_tokens == engine.prompt_tokens(j)


def test_prompt_longer_than_the_context_is_refused_before_queueing(engine):
    j = job("What colour is the shape?", COLOURS[0])
    prompt = engine.prompt_tokens(j)
    j.max_tokens = engine.context_length - prompt + 1
    with pytest.raises(PromptTooLong, match=rf"{prompt} tokens.*max_tokens is {j.max_tokens}.*{engine.context_length}"):
        engine.submit(j)
    assert engine.stats()["queue_depth"] == 0
    j.max_tokens -= 1  # exactly the context fits
    assert engine.prompt_tokens(j) == prompt


def test_async_iteration_gives_the_same_chunks(engine):
    async def gather(jobs):
        async def one(j):
            return [c async for c in engine.submit(j)]

        return await asyncio.gather(*(one(j) for j in jobs))

    jobs = [job(**m) for m in MIX[2:]]
    got = asyncio.run(gather(jobs))
    want = [collect(engine.submit(j)) for j in jobs]
    assert got == want


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_a_failing_step_fails_its_streams_and_the_engine_goes_on(assistant, phase):
    def boom(module, args):
        decoding = args[0] is not None  # the decode step passes token ids, the prefill spliced embeddings
        if decoding == (phase == "decode"):
            hook.remove()
            raise RuntimeError("injected failure")

    hook = assistant.inner.llm.register_forward_pre_hook(boom)
    engine = GenerationEngine(assistant)
    try:
        failing = [engine.submit(job(**m)) for m in MIX[3:5]]  # queued before the loop runs: one batch
        engine.start()
        with pytest.raises(RuntimeError, match="injected failure"):
            collect(failing[0])
        if phase == "decode":  # a failed decode step fails every row of the batch; a prefill its request only
            with pytest.raises(RuntimeError, match="injected failure"):
                collect(failing[1])
    finally:
        hook.remove()
    j = job(**MIX[1])
    stream = engine.submit(j)
    collect(stream)
    engine.close()
    assert stream.text == reference(assistant, j).text


def test_a_cancelled_stream_leaves_the_batch(engine):
    stream = engine.submit(job("What shape is it?", COLOURS[2], max_tokens=200, temperature=1.0, seed=7))
    stream.cancel()
    chunks = list(stream)
    assert chunks[-1].finish_reason == "cancelled" and stream.completion_tokens < 200
    collect(engine.submit(job(**MIX[3])))
    assert engine.stats()["batch_sizes"][-1] == 1  # the next request decodes alone


def test_close_ends_waiting_streams(assistant):
    eng = GenerationEngine(assistant)  # never started: the job stays queued
    stream = eng.submit(job(**MIX[0]))
    eng.close()
    with pytest.raises(EngineClosed):
        list(stream)
    with pytest.raises(EngineClosed):
        eng.submit(job(**MIX[0]))


def test_autocast_dtype_is_respected(assistant):
    """A bf16 assistant (the CUDA default) decodes under autocast, as its answer() does."""
    import dataclasses

    bf16 = dataclasses.replace(assistant, dtype=torch.bfloat16)
    with GenerationEngine(bf16) as eng:
        j = job(**MIX[0])
        stream = eng.submit(j)
        collect(stream)
    assert stream.text == reference(bf16, j).text


def test_a_row_that_cannot_pick_fails_alone(assistant, monkeypatch):
    engine = GenerationEngine(assistant)
    pick = engine._pick

    def failing(row):
        if row.job.seed == 99:
            raise RuntimeError("probability tensor contains nan")
        return pick(row)

    monkeypatch.setattr(engine, "_pick", failing)
    bad = engine.submit(job("What shape is it?", COLOURS[2], max_tokens=8, temperature=1.0, seed=99))
    good_job = job(**MIX[0])
    good = engine.submit(good_job)  # queued before the loop runs: one batch with the failing row
    with engine.start():
        with pytest.raises(RuntimeError, match="nan"):
            collect(bad)
        collect(good)
    assert good.text == reference(assistant, good_job).text


def test_a_temperature_too_small_to_divide_by_is_greedy(assistant, engine):
    tiny = job("What colour is the shape?", COLOURS[0], max_tokens=6, temperature=1e-45, seed=1)
    stream = engine.submit(tiny)
    collect(stream)
    assert stream.text == reference(assistant, job("What colour is the shape?", COLOURS[0], max_tokens=6)).text


def test_a_newcomer_that_cannot_join_fails_alone(assistant, engine, monkeypatch):
    set_batch, failed = engine._set_batch, []

    def merge_fails_once(rows, parts):
        if len(parts) > 1 and not failed:  # a merge of the running batch with a newcomer
            failed.append(True)
            raise torch.OutOfMemoryError("no room for the newcomer")
        return set_batch(rows, parts)

    decoding, submitted = threading.Event(), threading.Event()

    def hold(module, args):
        if args[0] is not None and not decoding.is_set():
            decoding.set()
            submitted.wait(timeout=30)

    monkeypatch.setattr(engine, "_set_batch", merge_fails_once)
    running_job = job("What shape is it?", COLOURS[2], max_tokens=24, temperature=1.0, seed=7)  # > 2 tokens
    hook = assistant.inner.llm.register_forward_pre_hook(hold)
    try:
        running = engine.submit(running_job)
        decoding.wait(timeout=30)
        newcomer = engine.submit(job(**MIX[0]))
        submitted.set()
        with pytest.raises(torch.OutOfMemoryError):
            collect(newcomer)
        collect(running)
    finally:
        hook.remove()
    assert failed and running.text == reference(assistant, running_job).text


def test_the_batch_cache_holds_room_until_the_next_change_only(assistant, monkeypatch):
    """A long answer beside a short one: room for the short one's tokens (when it leaves, the batch is repacked),
    not for the long one's whole answer in every row; the answers are unchanged."""
    engine = GenerationEngine(assistant)
    set_batch, room = engine._set_batch, []

    def recording(rows, parts):
        set_batch(rows, parts)
        remaining = [r.job.max_tokens - len(r.tokens) for r in rows]
        room.append((engine._cache.layers[0].k.shape[2] - engine._mask.shape[1], remaining))

    monkeypatch.setattr(engine, "_set_batch", recording)
    jobs = [job("What shape is it?", COLOURS[2], max_tokens=24, temperature=1.0, seed=7), job(**MIX[0])]
    streams = [engine.submit(j) for j in jobs]  # queued before the loop runs: one batch
    with engine.start():
        for s in streams:
            collect(s)
    assert room[0] == (min(room[0][1]), room[0][1]) and len(room[0][1]) == 2
    assert [s.text for s in streams] == [reference(assistant, j).text for j in jobs]


def test_a_text_only_request_does_not_run_the_vision_tower(assistant, engine):
    calls = []
    hook = assistant.inner.vision_tower.register_forward_hook(lambda *args: calls.append(1))
    try:
        text_job = job(**MIX[2])  # "Hi", no image
        stream = engine.submit(text_job)
        collect(stream)
    finally:
        hook.remove()
    assert calls == [] and stream.text == reference(assistant, text_job).text
