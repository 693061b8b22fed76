"""The official ``openai`` client against ``vlkit serve`` on 127.0.0.1: it chats with a NeVA run about an image (plain
and streamed) and gets the answer ``vlkit chat`` gives; it gets embeddings from a CLIP run equal to the model's own
normalised features."""

from __future__ import annotations

import base64
import io
import json
import tarfile

import openai
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vlkit.serve.app import BackgroundServer, Settings, create_app
from vlkit.serve.models import load_served

QUESTION = "What colour is the shape?"


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def neva_client(neva_run):
    served = load_served(neva_run, device="cpu")
    with BackgroundServer(create_app(served, Settings())) as server:
        yield openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0), served.id


@pytest.fixture(scope="module")
def val_image(vqa_dir):
    return sorted((vqa_dir / "images" / "val").glob("*.png"))[0]


def vlkit_chat(neva_run, image, prompt: str, max_new_tokens: int) -> dict:
    """What `vlkit chat --json` prints for the same question."""
    import contextlib

    from vlkit.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["chat", "--model", str(neva_run), "--image", str(image), "--prompt", prompt,
                     "--max-new-tokens", str(max_new_tokens), "--device", "cpu", "--json"])  # fmt: skip
    assert code == 0
    return json.loads(out.getvalue())


def test_chat_plain_and_streamed_equal_vlkit_chat(neva_client, neva_run, val_image):
    client, model_id = neva_client
    expected = vlkit_chat(neva_run, val_image, QUESTION, max_new_tokens=12)
    image_part = {"type": "image_url", "image_url": {"url": data_url(val_image.read_bytes())}}
    messages = [{"role": "user", "content": [{"type": "text", "text": QUESTION}, image_part]}]
    reply = client.chat.completions.create(model=model_id, messages=messages, max_tokens=12, temperature=0)
    choice = reply.choices[0]
    assert choice.message.content == expected["answer"]
    assert reply.model == model_id and reply.object == "chat.completion"
    assert choice.finish_reason == ("length" if expected["finish_reason"] == "length" else "stop")
    assert reply.usage.completion_tokens == expected["tokens"] + (expected["finish_reason"] == "eos")
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens

    chunks = list(client.chat.completions.create(model=model_id, messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))  # fmt: skip
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == expected["answer"]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [choice.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_chat_with_history_and_system_prompt_equals_the_assistant(neva_client, neva_run, val_image):
    from vlkit.data.conversation import GPT, HUMAN, IMAGE_TOKEN, Turn
    from vlkit.eval.vqa import load_assistant

    client, model_id = neva_client
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(val_image.read_bytes())}},
                                     {"type": "text", "text": QUESTION}]},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "What shape is it?"},
    ]  # fmt: skip
    reply = client.chat.completions.create(model=model_id, messages=messages, max_tokens=8, temperature=0)
    assistant, _ = load_assistant(neva_run, device="cpu")
    turns = [Turn(HUMAN, f"{IMAGE_TOKEN}\n{QUESTION}"), Turn(GPT, "red"), Turn(HUMAN, "What shape is it?")]
    expected = assistant.answer([turns], [Image.open(val_image).convert("RGB")], systems=["Answer briefly."],
                                max_new_tokens=8)[0]  # fmt: skip
    assert reply.choices[0].message.content == expected.text


def test_openai_client_raises_on_bad_requests(neva_client):
    client, model_id = neva_client
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}])  # fmt: skip
    assert "data URL" in e.value.message


def test_embeddings_equal_the_models_own_features(clip_run, shapes_dir):
    served = load_served(clip_run, device="cpu")
    model = served.encoder.model
    with tarfile.open(sorted((shapes_dir / "val").glob("*.tar"))[0]) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
        jpeg = tar.extractfile(member).read()
    texts = ["a red circle", "two blue squares on a white background"]
    with BackgroundServer(create_app(served, Settings())) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        by_text = client.embeddings.create(model=served.id, input=texts)
        by_image = client.embeddings.create(model=served.id, input=[
            {"type": "image_url", "image_url": {"url": data_url(jpeg, "image/jpeg")}}])  # fmt: skip
        b64 = client.embeddings.create(model=served.id, input=texts, encoding_format="base64")
    from vlkit.data.tokenizer import get_tokenizer
    from vlkit.data.transforms import get_transform

    cfg = model.config.text
    tokenizer = get_tokenizer(cfg.tokenizer, cfg.encoder_seq_length)
    with torch.no_grad():
        text_features = F.normalize(model.encode_text(tokenizer(texts)), dim=-1)
        pixels = get_transform(model, train=False)(Image.open(io.BytesIO(jpeg)).convert("RGB"))[None]
        image_features = F.normalize(model.encode_image(pixels), dim=-1)
    got_text = torch.tensor([d.embedding for d in by_text.data])
    assert got_text.shape == text_features.shape and [d.index for d in by_text.data] == [0, 1]
    torch.testing.assert_close(got_text, text_features, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor([by_image.data[0].embedding]), image_features, atol=1e-5, rtol=0)
    decoded = [torch.frombuffer(bytearray(base64.b64decode(d.embedding)), dtype=torch.float32) for d in b64.data]
    torch.testing.assert_close(torch.stack(decoded), got_text, atol=0, rtol=0)
    assert by_text.usage.prompt_tokens > 0
