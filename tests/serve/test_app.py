"""The HTTP API of ``vlkit serve`` on 127.0.0.1: health, models, metrics, classification, search, and every kind of
bad request answered with a 4xx in OpenAI's error shape, after which the server still serves."""

from __future__ import annotations

import base64
import io
import json
import re
import socket
import tarfile
import time

import httpx
import pytest
import torch
from PIL import Image

from vlkit.serve.app import BackgroundServer, Settings, create_app
from vlkit.serve.models import load_served

KEY = "s3cret"


def data_url(image: Image.Image | bytes, fmt: str = "PNG") -> str:
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, fmt)
        image = buf.getvalue()
    return "data:image/png;base64," + base64.b64encode(image).decode()


@pytest.fixture(scope="module")
def val_images(shapes_dir, tmp_path_factory):
    """The held-out shapes images as files, with their captions: [(path, caption)]."""
    out = tmp_path_factory.mktemp("serve-val-images")
    items = {}
    for shard in sorted((shapes_dir / "val").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, _, ext = m.name.rpartition(".")
                if ext in ("jpg", "txt"):
                    items.setdefault(key, {})[ext] = tar.extractfile(m).read()
    rows = []
    for key, parts in sorted(items.items())[:16]:
        path = out / f"{key}.jpg"
        path.write_bytes(parts["jpg"])
        rows.append((path, parts["txt"].decode().strip()))
    return rows


@pytest.fixture(scope="module")
def clip_served(clip_run, val_images, tmp_path_factory):
    """The CLIP run with an index of the held-out images (built with the served model's own encoder)."""
    from vlkit.serve.index import create_index

    served = load_served(clip_run, device="cpu")
    vectors = served.encoder.embed_images([Image.open(p).convert("RGB") for p, _ in val_images])
    index_dir = tmp_path_factory.mktemp("serve-index") / "val"
    create_index(index_dir, vectors, [{"path": str(p), "key": p.stem, "caption": c} for p, c in val_images],
                 model_id=served.encoder.model_id)  # fmt: skip
    return load_served(clip_run, device="cpu", index=index_dir)


@pytest.fixture(scope="module")
def clip_server(clip_served):
    with BackgroundServer(create_app(clip_served, Settings(allow_local_files=True, max_wait_ms=2))) as server:
        yield server


@pytest.fixture(scope="module")
def strict_server(clip_run):
    """Tight limits and an API key: 64x64 images at most, 50 kB requests."""
    settings = Settings(api_key=KEY, max_image_pixels=64 * 64, max_request_mb=0.05)
    with BackgroundServer(create_app(load_served(clip_run, device="cpu", name="clip"), settings)) as server:
        yield server


@pytest.fixture(scope="module")
def neva_served(neva_run):
    return load_served(neva_run, device="cpu")


@pytest.fixture(scope="module")
def neva_server(neva_served):
    with BackgroundServer(create_app(neva_served, Settings())) as server:
        yield server


@pytest.fixture(scope="module")
def classifier_server(classifier_run):
    with BackgroundServer(create_app(load_served(classifier_run, device="cpu"), Settings())) as server:
        yield server


def post(server, path: str, body=None, *, content=None, headers=None) -> httpx.Response:
    return httpx.post(server.url + path, json=body, content=content, headers=headers, timeout=60)


def assert_error(response: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == ("invalid_request_error" if status in (400, 413) else error["type"])
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


def test_health_models_and_metrics(clip_server, clip_served):
    health = httpx.get(clip_server.url + "/health").json()
    assert health == {"status": "ok", "model": clip_served.id, "kind": "clip"}
    models = httpx.get(clip_server.url + "/v1/models").json()
    assert models["object"] == "list" and len(models["data"]) == 1
    entry = models["data"][0]
    assert entry["id"] == clip_served.id and entry["object"] == "model" and entry["owned_by"] == "vlkit"
    assert entry["kind"] == "clip" and entry["classes"] is None
    assert entry["index"] == {"items": 16, "dim": clip_served.encoder.dim}
    assert post(clip_server, "/v1/embeddings", {"input": ["a red circle", "a blue square"]}).status_code == 200
    post(clip_server, "/v1/embeddings", {"input": 3})  # one error, counted
    text = httpx.get(clip_server.url + "/metrics").text
    samples = {}
    for line in text.splitlines():
        if line.startswith("#") or not line:
            continue
        match = re.fullmatch(r'([a-z_]+)(\{[a-z_]+="[^"]*"(?:,[a-z_]+="[^"]*")*\})? (-?[0-9.e+]+|\+Inf)', line)
        assert match, f"not Prometheus text: {line!r}"
        samples[match[1] + (match[2] or "")] = float(match[3])
    assert samples['vlkit_requests_total{endpoint="/v1/embeddings",status="200"}'] >= 1
    assert samples['vlkit_requests_total{endpoint="/v1/embeddings",status="400"}'] >= 1
    assert samples['vlkit_errors_total{endpoint="/v1/embeddings",code="invalid_value"}'] >= 1  # the answer's code
    assert samples['vlkit_request_duration_seconds_count{endpoint="/v1/embeddings"}'] >= 2
    assert samples['vlkit_batch_size_count{queue="embed_text"}'] >= 1
    assert samples['vlkit_queue_depth{queue="embed_image"}'] == 0
    assert "vlkit_generated_tokens_per_second" in samples


def test_classify_with_a_vit_classifier(classifier_server, classifier_run):
    from vlkit.predict import find_class_names, predict

    served = load_served(classifier_run, device="cpu")
    names = find_class_names(served.path, served.classifier.num_classes)
    image_file = next(classifier_run.parents[1].glob("serve-classes*/val/*/*.png"))  # the fixture's dataset
    image = Image.open(image_file).convert("RGB")
    models = httpx.get(classifier_server.url + "/v1/models").json()["data"][0]
    assert models["kind"] == "classifier" and models["classes"] == names
    got = post(classifier_server, "/v1/classify", {"image": data_url(image)}).json()
    assert [d["label"] for d in got["data"]] == [names[d["index"]] for d in got["data"]] and len(got["data"]) == 5
    expected = predict(served.classifier.model, [image], topk=5)[0]
    assert [d["index"] for d in got["data"]] == [i for i, _ in expected]
    assert [d["score"] for d in got["data"]] == pytest.approx([p for _, p in expected], abs=1e-5)
    error = assert_error(post(classifier_server, "/v1/classify", {"image": data_url(image), "labels": ["a"]}), 400,
                         "labels")  # fmt: skip
    assert "classes are fixed" in error["message"]


def test_zero_shot_classify_with_clip(clip_server, clip_served, val_images):
    from vlkit.eval.templates import resolve_templates
    from vlkit.predict import predict_zeroshot

    labels = ["red circle", "blue square", "green triangle"]
    image = Image.open(val_images[0][0]).convert("RGB")
    got = post(clip_server, "/v1/classify", {"image": data_url(image), "labels": labels, "top_k": 3}).json()
    expected = predict_zeroshot(clip_served.encoder.model, [image], labels, resolve_templates("openai")[0], topk=3)[0]
    assert [(d["index"], d["label"]) for d in got["data"]] == [(i, labels[i]) for i, _ in expected]
    assert [d["score"] for d in got["data"]] == pytest.approx([p for _, p in expected], abs=1e-4)
    assert sum(d["score"] for d in got["data"]) == pytest.approx(1.0, abs=1e-5)
    assert_error(post(clip_server, "/v1/classify", {"image": data_url(image)}), 400, "labels")


def test_zero_shot_rows_are_built_once_per_label(clip_served, val_images):
    """Concurrent requests with the same new labels share one build; a label seen before, in any set and order, is
    not built again; more labels than a slice are built in several forward-thread jobs."""
    import asyncio

    from vlkit.serve.app import LABEL_SLICE, _Runtime

    rt = _Runtime(clip_served, Settings())
    built: list[list[str]] = []
    build = rt._build
    rt._build = lambda labels: built.append(list(labels)) or build(labels)

    async def scenario():
        await rt.start()
        try:
            a, b = await asyncio.gather(rt.label_matrix(["red circle", "blue square"]),
                                        rt.label_matrix(["blue square", "red circle"]))  # fmt: skip
            c = await rt.label_matrix(["green triangle", "red circle"])
            many = [f"shape {i}" for i in range(LABEL_SLICE + 3)]
            await rt.label_matrix(many)
            return a, b, c
        finally:
            await rt.close()

    a, b, c = asyncio.run(scenario())
    assert built[:2] == [["red circle", "blue square"], ["green triangle"]]
    assert [len(x) for x in built[2:]] == [LABEL_SLICE, 3]
    assert torch.equal(a, b.flip(0)) and torch.equal(c[1], a[0])
    whole = build(["red circle", "blue square"])  # the rows do not depend on their company
    assert torch.allclose(a, whole, atol=1e-6)


def test_search_by_image_and_text_and_thumbnails(clip_server, val_images):
    path, caption = val_images[5]
    got = post(clip_server, "/v1/search", {"image": data_url(Image.open(path).convert("RGB")), "top_k": 3}).json()
    first = got["data"][0]
    assert len(got["data"]) == 3 and [d["rank"] for d in got["data"]] == [1, 2, 3]
    assert first["row"] == 5 and first["path"] == str(path) and first["caption"] == caption
    assert first["score"] == pytest.approx(1.0, abs=5e-3)  # the index stores float16 vectors
    by_text = post(clip_server, "/v1/search", {"query": caption, "top_k": 16}).json()["data"]
    assert sorted(d["row"] for d in by_text) == list(range(16))
    assert [d["score"] for d in by_text] == sorted((d["score"] for d in by_text), reverse=True)
    thumb = httpx.get(clip_server.url + first["image_url"])
    assert thumb.status_code == 200 and thumb.content == path.read_bytes()
    assert thumb.headers["content-type"] == "image/jpeg"
    assert_error(httpx.get(clip_server.url + "/v1/index/items/99/image"), 404)
    assert_error(post(clip_server, "/v1/search", {"query": "x", "image": data_url(thumb.content)}), 400)
    assert_error(post(clip_server, "/v1/search", {}), 400)


def test_local_files_only_when_allowed(clip_server, strict_server, val_images):
    path = val_images[0][0]
    body = {"input": [{"type": "image_url", "image_url": {"url": f"file://{path}"}}]}
    assert post(clip_server, "/v1/embeddings", body).status_code == 200
    assert post(clip_server, "/v1/embeddings", {"input": [{"type": "image_url", "image_url": {"url": str(path)}}]})\
        .status_code == 200  # fmt: skip
    error = assert_error(post(strict_server, "/v1/embeddings", body, headers={"Authorization": f"Bearer {KEY}"}), 400,
                         "input[0].image_url.url", "invalid_image_url")  # fmt: skip
    assert "--allow-local-files" in error["message"]


def test_a_local_file_that_is_no_image_does_not_leak_its_content(clip_server, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("hunter2 is the password")
    body = {"input": [{"type": "image_url", "image_url": {"url": str(secret)}}]}
    error = assert_error(post(clip_server, "/v1/embeddings", body), 400, "input[0].image_url.url", "invalid_image")
    assert "hunter" not in error["message"] and "bytes" not in error["message"]
    inline = {"input": [{"type": "image_url", "image_url": {"url": data_url(secret.read_bytes())}}]}
    assert "starting b'hunter2" in assert_error(post(clip_server, "/v1/embeddings", inline), 400)["message"]


def test_api_key(strict_server):
    body = {"input": "a red circle"}
    assert_error(post(strict_server, "/v1/embeddings", body), 401, code="invalid_api_key")
    assert_error(post(strict_server, "/v1/embeddings", body, headers={"Authorization": "Bearer wrong"}), 401)
    assert_error(httpx.get(strict_server.url + "/v1/models"), 401)
    assert httpx.get(strict_server.url + "/health").status_code == 200  # liveness probes carry no key
    ok = post(strict_server, "/v1/embeddings", body, headers={"Authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200 and ok.json()["model"] == "clip"


GOOD_EMBEDDING = {"input": "a red circle"}
PNG_200 = Image.new("RGB", (200, 200), "red")
PNG_48 = Image.new("RGB", (48, 48), "blue")  # 2304 pixels: under the strict server's 4096, two of them are not
ERROR_CASES = {
    # name: (path, body or raw bytes, status, param, code)
    "invalid json": ("/v1/embeddings", b'{"input": ', 400, None, "invalid_json"),
    "body not an object": ("/v1/embeddings", b"[1, 2]", 400, None, None),
    "missing field": ("/v1/embeddings", {}, 400, "input", None),
    "wrong type": ("/v1/embeddings", {"input": 3}, 400, "input", None),
    "wrong nested type": ("/v1/search", {"query": "x", "top_k": "many"}, 400, "top_k", None),
    "empty input": ("/v1/embeddings", {"input": []}, 400, "input", None),
    "bad encoding_format": ("/v1/embeddings", {"input": "x", "encoding_format": "int8"}, 400, "encoding_format", None),
    "undecodable image": ("/v1/embeddings", {"input": [{"type": "image_url", "image_url": {
        "url": data_url(b"not an image at all")}}]}, 400, "input[0].image_url.url", "invalid_image"),
    "bad base64": ("/v1/classify", {"image": "data:image/png;base64,@@@", "labels": ["a"]}, 400, "image",
                   "invalid_image_url"),
    "remote url": ("/v1/classify", {"image": "https://example.com/cat.png", "labels": ["a"]}, 400, "image",
                   "invalid_image_url"),
    "image over max pixels": ("/v1/classify", {"image": data_url(PNG_200), "labels": ["a", "b"]}, 400, "image",
                              "image_too_large"),
    "a thin strip (resized, it would be huge)": ("/v1/classify", {"image": data_url(Image.new("RGB", (2000, 1))),
                                                "labels": ["a"]}, 400, "image", "image_too_large"),  # fmt: skip
    "body over max mb": ("/v1/embeddings", {"input": "x" * 60_000}, 413, None, "request_too_large"),
    "model not served": ("/v1/embeddings", {"model": "gpt-4o", "input": "x"}, 404, "model", "model_not_found"),
    "chat to a clip model": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, 400, "model",
                             "unsupported_model"),
    "unknown endpoint": ("/v1/completions", {"prompt": "hi"}, 404, None, None),
    "empty body": ("/v1/embeddings", b"", 400, None, None),
    "malformed image url": ("/v1/classify", {"image": "http://[::1", "labels": ["a"]}, 400, "image",
                            "invalid_image_url"),
    "images over max pixels together": ("/v1/embeddings", {"input": [{"type": "image_url", "image_url": {
        "url": data_url(PNG_48)}}] * 2}, 400, "input", "image_too_large"),
    "too many inputs": ("/v1/embeddings", {"input": ["x"] * 2049}, 400, "input", None),
}  # fmt: skip


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(strict_server, case):
    path, body, status, param, code = ERROR_CASES[case]
    auth = {"Authorization": f"Bearer {KEY}"}
    if isinstance(body, bytes):
        response = post(strict_server, path, content=body, headers={**auth, "Content-Type": "application/json"})
    else:
        response = post(strict_server, path, body, headers=auth)
    assert_error(response, status, param, code)
    assert post(strict_server, "/v1/embeddings", GOOD_EMBEDDING, headers=auth).status_code == 200


def test_body_limit_holds_without_content_length(strict_server):
    """A chunked upload declares no length: the limit is enforced while the body is read."""
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}

    def chunks():
        yield b'{"input": "'
        for _ in range(20):
            yield b"x" * 5000
        yield b'"}'

    assert_error(post(strict_server, "/v1/embeddings", content=chunks(), headers=auth), 413, code="request_too_large")
    assert post(strict_server, "/v1/embeddings", GOOD_EMBEDDING, headers={"Authorization": f"Bearer {KEY}"})\
        .status_code == 200  # fmt: skip


def chat(messages, **extra) -> dict:
    return {"messages": messages, "max_tokens": 4, **extra}


def image_message(url: str, text: str = "What colour is the shape?") -> dict:
    return {"role": "user", "content": [{"type": "text", "text": text},
                                        {"type": "image_url", "image_url": {"url": url}}]}  # fmt: skip


def test_chat_errors(neva_server, vqa_dir):
    url = data_url((vqa_dir / "images" / "val").glob("*.png").__next__().read_bytes())
    good = chat([image_message(url)])
    cases = [
        (chat([{"role": "user", "content": "word " * 5000}]), 400, "messages", "context_length_exceeded"),
        (chat([image_message(url), {"role": "assistant", "content": "red"}, image_message(url)]), 400,
         "messages[2].content[1].image_url.url", "too_many_images"),
        (chat([image_message(url)], n=2), 400, "n", None),
        (chat([image_message(url)], temperature=-1), 400, "temperature", None),
        (chat([{"role": "assistant", "content": "hi"}]), 400, "messages", None),
        (chat([{"role": "robot", "content": "hi"}]), 400, "messages[0].role", None),
        (chat([{"role": "user", "content": [{"type": "audio", "audio": "x"}]}]), 400, None, None),
        (chat([image_message(url)], stop=["a", "b", "c", "d", "e"]), 400, "stop", None),
        (chat([image_message(url)], seed=2**64, temperature=1), 400, "seed", None),
        ({"messages": []}, 400, "messages", None),
        ({**good, "model": "other"}, 404, "model", "model_not_found"),
        ({"input": "x"}, 400, "messages", None),
    ]  # fmt: skip
    for body, status, param, code in cases:
        assert_error(post(neva_server, "/v1/chat/completions", body), status, param, code)
    assert_error(post(neva_server, "/v1/embeddings", {"input": "x"}), 400, "model", "unsupported_model")
    assert_error(post(neva_server, "/v1/classify", {"image": url}), 400, "model", "unsupported_model")
    response = post(neva_server, "/v1/chat/completions", good)
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
    assert 1 <= body["usage"]["completion_tokens"] <= 4
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    text = httpx.get(neva_server.url + "/metrics").text
    assert re.search(r"^vlkit_generated_tokens_total [1-9]", text, re.M)
    assert 'vlkit_queue_depth{queue="generation"} 0' in text


def test_a_padding_model_refuses_an_image_whose_square_is_over_the_limit(neva_server, neva_served):
    """LLaVA's pad mode makes the square canvas before resizing: 8000 x 1000 (8 M pixels) would become 64 M."""
    wide = data_url(Image.new("RGB", (8000, 1000), "red"))
    before, neva_served.aspect = neva_served.aspect, "pad"
    try:
        error = assert_error(post(neva_server, "/v1/chat/completions", chat([image_message(wide)])), 400,
                             "messages[0].content[1].image_url.url", "image_too_large")  # fmt: skip
        assert "8000x8000" in error["message"]
    finally:
        neva_served.aspect = before


def test_a_stream_that_fails_says_so_without_internals_and_counts_an_error(neva_server, neva_served, vqa_dir, caplog):
    def boom(module, args, output):
        raise RuntimeError("secret internals at 0xdeadbeef")

    url = data_url((vqa_dir / "images" / "val").glob("*.png").__next__().read_bytes())
    hook = neva_served.engine.inner.register_forward_hook(boom)
    try:
        with caplog.at_level("ERROR", logger="vlkit.serve"):
            response = post(neva_server, "/v1/chat/completions", chat([image_message(url)], stream=True))
    finally:
        hook.remove()
    assert response.status_code == 200  # the headers went out before the failure
    events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
    error = events[-1]["error"]
    assert error["code"] == "generation_failed" and "RuntimeError" in error["message"]
    assert "deadbeef" not in error["message"] and "deadbeef" in caplog.text  # in the log only
    metrics = httpx.get(neva_server.url + "/metrics").text
    assert 'vlkit_errors_total{endpoint="/v1/chat/completions",code="generation_failed"} 1' in metrics


def test_a_client_that_hangs_up_frees_its_chat_row(neva_server, neva_served, vqa_dir):
    """A non-streamed answer whose client disconnects stops generating (Starlette does not cancel the endpoint)."""
    engine = neva_served.engine
    eos = sorted(engine._eos)

    def slow_and_endless(module, args, output):  # 50 ms a step, and the end token never wins
        time.sleep(0.05)
        output[..., eos] = float("-inf")

    url = data_url((vqa_dir / "images" / "val").glob("*.png").__next__().read_bytes())
    body = json.dumps(chat([image_message(url)], max_tokens=60, temperature=1.0, seed=3)).encode()
    host, port = neva_server.url.removeprefix("http://").split(":")
    hook = engine.inner.register_forward_hook(slow_and_endless)
    try:
        before = engine.stats()["generated_tokens"]
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
            _wait_for(lambda: engine.stats()["generated_tokens"] - before >= 3, "generation to start", timeout=30)
        _wait_for(lambda: engine.stats()["active"] == 0, "the row to leave the batch")
        assert engine.stats()["generated_tokens"] - before < 30  # of 60: it stopped well before the end (3 s)
    finally:
        hook.remove()
    assert post(neva_server, "/v1/chat/completions", chat([image_message(url)])).status_code == 200
    assert re.search(r'vlkit_requests_total\{endpoint="/v1/chat/completions",status="499"\} 1',
                     httpx.get(neva_server.url + "/metrics").text)  # fmt: skip


def _wait_for(condition, what: str, timeout: float = 1.5) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_web_page_is_served(clip_server):
    page = httpx.get(clip_server.url + "/")
    assert page.status_code == 200 and "<html" in page.text.lower()
    assert httpx.get(clip_server.url + "/static/app.js").status_code == 200


def test_embeddings_base64_and_float_agree(clip_server):
    floats = post(clip_server, "/v1/embeddings", {"input": ["a", "b"]}).json()
    b64 = post(clip_server, "/v1/embeddings", {"input": ["a", "b"], "encoding_format": "base64"}).json()
    for f, b in zip(floats["data"], b64["data"]):
        decoded = torch.frombuffer(bytearray(base64.b64decode(b["embedding"])), dtype=torch.float32)
        assert torch.equal(decoded, torch.tensor(f["embedding"], dtype=torch.float32))
    assert floats["usage"]["prompt_tokens"] == floats["usage"]["total_tokens"] > 0
    assert json.dumps(floats)  # plain JSON
