"""vlkit chat: one answer with --prompt (max new tokens, stop strings, sampling), the interactive loop driven through
stdin (conversation memory, /reset, /image, unknown commands, Ctrl-D), and usage errors (exit 2)."""

import io
import json

import pytest
import torch

from vlkit.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A randomly initialised neva-tiny saved with its tokenizer's path, and two shapes-vqa images."""
    from vlkit.data.shapes_vqa import write_shapes_vqa
    from vlkit.interop.native import save_model
    from vlkit.models import create_model

    root = tmp_path_factory.mktemp("chat")
    write_shapes_vqa(root / "data", train=4, val=2, progress=False)
    torch.manual_seed(0)
    save_model(create_model("neva-tiny", llm__tokenizer=str(root / "data" / "tokenizer")), root / "model")
    images = sorted((root / "data" / "images" / "val").iterdir())
    return root / "model", images


def chat(capsys, model, image, *args):
    code = main(["chat", "--model", str(model), "--image", str(image), *args])
    return code, capsys.readouterr()


def test_prompt_respects_max_new_tokens(tiny, capsys):
    model, (image, _) = tiny
    code, out = chat(capsys, model, image, "--prompt", "What colour is the shape?", "--max-new-tokens", "5", "--json")
    assert code == 0
    result = json.loads(out.out)
    assert result["tokens"] == 5 and result["finish_reason"] == "length" and result["answer"]
    assert result["template"] == "llama_2" and result["tokenizer"].endswith("tokenizer")


def test_stop_strings_cut_the_answer(tiny, capsys):
    model, (image, _) = tiny
    args = ("--prompt", "Describe the image.", "--max-new-tokens", "12", "--json")
    full = json.loads(chat(capsys, model, image, *args)[1].out)["answer"]
    stop = full.strip()[3:5]  # greedy is deterministic: the same answer again, stopped inside
    code, out = chat(capsys, model, image, *args, "--stop", stop)
    result = json.loads(out.out)
    assert code == 0 and result["finish_reason"] == "stop"
    assert result["answer"] == full[: full.find(stop)].strip() and stop not in result["answer"]
    assert result["tokens"] < 12


def test_sampling_is_seeded(tiny, capsys):
    model, (image, _) = tiny
    args = ("--prompt", "What shape is it?", "--temperature", "1.5", "--top-p", "0.9", "--max-new-tokens", "8")
    first = chat(capsys, model, image, *args, "--seed", "1")[1].out
    assert chat(capsys, model, image, *args, "--seed", "1")[1].out == first


def test_interactive_session_through_stdin(tiny, capsys, monkeypatch):
    from vlkit.eval.vqa import Assistant

    model, (image, other) = tiny
    asked = []
    answer = Assistant.answer

    def spy(self, conversations, images, **kwargs):
        asked.append([(t.role, t.text) for t in conversations[0]])
        return answer(self, conversations, images, **kwargs)

    monkeypatch.setattr(Assistant, "answer", spy)
    lines = ["What colour is the shape?", "", "What shape is it?", "/reset", "Is it red?", "/bogus",
             f"/image {other}", "/image nowhere.png", "How big is it?"]  # fmt: skip
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    code, out = chat(capsys, model, image, "--max-new-tokens", "3")
    assert code == 0  # end of input (Ctrl-D) ends the session
    assert out.out.count("assistant> ") == 4
    assert "(conversation cleared)" in out.out and "(new image; conversation cleared)" in out.out
    assert "unknown command /bogus" in out.out and "nowhere.png: no such file" in out.out
    # The second question is asked after the first exchange; /reset and /image start over.
    assert asked[0] == [("human", "<image>\nWhat colour is the shape?")]
    assert [r for r, _ in asked[1]] == ["human", "gpt", "human"] and asked[1][2] == ("human", "What shape is it?")
    assert asked[2] == [("human", "<image>\nIs it red?")]
    assert asked[3] == [("human", "<image>\nHow big is it?")]


def test_usage_errors_exit_2(tiny, tmp_path, capsys):
    model, (image, _) = tiny
    code, out = chat(capsys, tmp_path / "none", image, "--prompt", "hi")
    assert code == 2 and "no such file or directory" in out.err
    code, out = chat(capsys, model, tmp_path / "none.png", "--prompt", "hi")
    assert code == 2 and "none.png: no such file" in out.err
    (tmp_path / "bad.png").write_bytes(b"not an image")
    code, out = chat(capsys, model, tmp_path / "bad.png", "--prompt", "hi")
    assert code == 2 and "not a usable image" in out.err
    code, out = chat(capsys, model, image, "--prompt", "hi", "--template", "nope")
    assert code == 2 and "unknown conversation template 'nope'" in out.err
