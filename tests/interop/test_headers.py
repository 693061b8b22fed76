"""Weight files are judged by their headers before anything is allocated (issue 13): a damaged header is a one-line
ModelFormatError naming the file; a config.json whose shapes contradict the stored tensors, or whose model cannot fit
the machine, is refused from the meta device, naming the tensor / key and the sizes."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

import vlkit
from vlkit.cli import main
from vlkit.interop import native
from vlkit.interop.checkpoint_files import CheckpointError, read_safetensors_header
from vlkit.utils import memory


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "clip"
    vlkit.save_model(vlkit.create_model("clip-tiny"), path)
    return path


@pytest.fixture
def no_allocation(monkeypatch):
    """Loading real weights into a real model fails the test: every refusal here comes before."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was allocated before the header checks refused it")

    monkeypatch.setattr(native, "_from_weights", refuse)
    monkeypatch.setattr(native, "read_tensors", refuse)


def _copy(src: Path, dst: Path, weights: bytes | None = None, **vision: int) -> Path:
    shutil.copytree(src, dst)
    if weights is not None:
        (dst / "model.safetensors").write_bytes(weights)
    if vision:
        config = json.loads((dst / "config.json").read_text())
        config["model"]["vision"].update(vision)
        (dst / "config.json").write_text(json.dumps(config))
    return dst


def _convert(capsys, src: Path, out: Path) -> tuple[int, str]:
    code = main(["convert", "--to", "hf", str(src), "--out", str(out)])
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") <= 1
    return code, err


@pytest.mark.parametrize(
    "weights, says",
    [
        (struct.pack("<Q", 2**40) + b"junk" * 8, "header length field says 1,099,511,627,776 bytes"),
        (struct.pack("<Q", 12) + b"not json!!!!" + b"\0" * 16, "its header is not JSON"),
        (b"\x01\x02", "less than its 8-byte header length"),
        (struct.pack("<Q", 2) + b"[]", "header is a JSON list"),
    ],
)
def test_damaged_header_is_named(capsys, tmp_path, tiny, no_allocation, weights, says):
    src = _copy(tiny, tmp_path / "m", weights)
    code, err = _convert(capsys, src, tmp_path / "out")
    assert code == 2 and f"{src / 'model.safetensors'}: " in err and says in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(native.ModelFormatError, match=says):
        vlkit.load_model(src)


def test_truncated_data_is_found_from_the_header(tmp_path, tiny):
    data = (tiny / "model.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="damaged or truncated"):
        read_safetensors_header(tmp_path / "cut.safetensors")
    header = read_safetensors_header(tiny / "model.safetensors")
    assert header.tensors["visual.class_token"] == ("F32", (1, 1, 64))


def test_absurd_width_refused_before_allocation(capsys, tmp_path, tiny, no_allocation):
    src = _copy(tiny, tmp_path / "m", hidden_size=1_000_000_000, num_attention_heads=1)
    code, err = _convert(capsys, src, tmp_path / "out")
    assert code == 2
    assert f"{src / 'config.json'}: model.vision.hidden_size=1000000000: the model needs a tensor of shape" in err
    assert "EB (fp32)" in err


def test_shape_mismatch_names_the_tensor_and_both_shapes(tmp_path, tiny, no_allocation):
    src = _copy(tiny, tmp_path / "m", hidden_size=100_000)
    with pytest.raises(native.ModelFormatError) as e:
        vlkit.load_model(src)
    assert str(e.value) == (
        f"{src / 'config.json'}: the weights do not fit the config: tensor visual.class_token is stored as "
        "[1, 1, 64], the config implies [1, 1, 100000] (model.vision.hidden_size=100000)"
    )


def test_model_larger_than_the_machine(capsys, tmp_path, tiny, monkeypatch, no_allocation):
    monkeypatch.setattr(memory, "host_memory", lambda: 100_000)
    code, err = _convert(capsys, tiny, tmp_path / "out")
    assert code == 2
    assert f"{tiny / 'config.json'}: model.text.vocab_size=49408: the model needs ~" in err
    assert "parameters (fp32), this machine has 100 kB" in err


def test_hf_clip_config_checked_against_headers(tmp_path, tiny, monkeypatch):
    from vlkit.interop.hf import load_hf, save_hf

    hf = save_hf(vlkit.load_model(tiny), tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    config["vision_config"]["intermediate_size"] = 10**6
    (hf / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr("vlkit.interop.hf.read_hf_weights", lambda p: pytest.fail("weights read before the check"))
    with pytest.raises(native.ModelFormatError) as e:
        load_hf(hf)
    assert str(e.value).endswith(
        "tensor visual.transformer.blocks.0.mlp.fc1.weight is stored as [256, 64], the config implies [1000000, 64] "
        "(vision_config.intermediate_size=1000000)"
    )


def test_hf_llama_size_refused_from_headers(tmp_path, monkeypatch):
    from vlkit.interop.hf_llama import load_hf_llama, save_hf_llama

    path = save_hf_llama(vlkit.create_model("llama-tiny"), tmp_path / "llama")
    monkeypatch.setattr(memory, "host_memory", lambda: 1000)
    with pytest.raises(memory.TooLargeError, match=r"config\.json: .*the model needs ~.* parameters \(fp32\), this"):
        load_hf_llama(path)
    (path / "model.safetensors").write_bytes(struct.pack("<Q", 2**40))
    with pytest.raises(native.ModelFormatError, match="model.safetensors: .*header length field"):
        load_hf_llama(path)
