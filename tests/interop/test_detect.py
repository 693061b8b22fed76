"""vlkit.load_model recognises vlkit, Hugging Face and open_clip models by content, and refuses anything else."""

import json
import os
import pickle
import shlex
import shutil

import pytest
import torch
from hf_models import build_hf
from safetensors.torch import save_file

import vlkit
from vlkit.interop.native import ModelFormatError, detect_format, read_weights_file
from vlkit.interop.open_clip import save_open_clip, to_open_clip_state_dict


@pytest.fixture(scope="module")
def tiny_clip():
    torch.manual_seed(0)
    return vlkit.create_model("clip-tiny", vision__activation="quick_gelu", text__activation="quick_gelu").eval()


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_each_format_is_recognised_by_content(tmp_path, tiny_clip):
    vlkit.save_model(tiny_clip, tmp_path / "vlkit")
    build_hf(tmp_path / "hf")
    save_open_clip(tiny_clip, tmp_path / "open_clip")
    assert detect_format(tmp_path / "vlkit") == ("vlkit", tmp_path / "vlkit")
    assert detect_format(tmp_path / "vlkit" / "config.json") == ("vlkit", tmp_path / "vlkit")  # means its directory
    assert detect_format(tmp_path / "hf") == ("hf", tmp_path / "hf")
    assert detect_format(tmp_path / "open_clip") == ("open_clip", tmp_path / "open_clip")
    _same_weights(vlkit.load_model(tmp_path / "open_clip"), tiny_clip)


@pytest.mark.parametrize("writer", ["safetensors", "torch"])
def test_bare_open_clip_checkpoint_whatever_its_name(tmp_path, tiny_clip, writer):
    """The file name says nothing: safetensors named .bin and a torch file named .safetensors are both read."""
    state = to_open_clip_state_dict(tiny_clip)
    if writer == "safetensors":
        path = tmp_path / "weights.bin"
        save_file(state, str(path))
    else:
        path = tmp_path / "weights.safetensors"
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)  # a training ckpt
    assert detect_format(path) == ("open_clip", path)
    assert len(read_weights_file(path)) == len(state)  # unwrapped from the training checkpoint
    # A bare checkpoint has no config: open_clip's loader asks for the model name or config JSON.
    with pytest.raises(ModelFormatError, match="model_name"):
        vlkit.load_model(path)


def test_hugging_face_vision_tower_points_to_the_vision_loader(tmp_path):
    hf = build_hf(tmp_path / "clip")
    config = json.loads((tmp_path / "clip" / "config.json").read_text())
    (tmp_path / "vision").mkdir()
    (tmp_path / "vision" / "config.json").write_text(
        json.dumps({**config["vision_config"], "model_type": "clip_vision_model"})
    )
    save_file(
        {k: v.contiguous() for k, v in hf.vision_model.state_dict().items()},
        str(tmp_path / "vision" / "model.safetensors"),
    )
    assert detect_format(tmp_path / "vision")[0] == "hf_vision"
    with pytest.raises(ModelFormatError, match="load_vision_encoder"):
        vlkit.load_model(tmp_path / "vision")
    assert vlkit.load_vision_encoder(tmp_path / "vision").hidden_size == 48


class _Evil:
    """Unpickling this runs a shell command: what a malicious checkpoint does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


@pytest.mark.parametrize("container", ["torch_zip", "raw_pickle", "hf_dir"])
def test_code_executing_pickle_is_refused(tmp_path, container):
    marker = tmp_path / "pwned"
    payload = {"visual.proj": torch.zeros(2), "logit_scale": _Evil(marker)}
    if container == "hf_dir":
        build_hf(tmp_path / "m", tokenizer=False)
        (tmp_path / "m" / "model.safetensors").unlink()
        path, target = tmp_path / "m", tmp_path / "m" / "pytorch_model.bin"
    else:
        path = target = tmp_path / "checkpoint.pt"
    if container == "raw_pickle":
        target.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, target)
    with pytest.raises(ModelFormatError, match=r"refused: torch.load\(weights_only=True\)") as e:
        vlkit.load_model(path)
    assert "never unpickles with full pickle" in str(e.value) and str(target) in str(e.value)
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.script is deprecated: it still writes the archive
def test_torchscript_archive_is_refused_with_advice(tmp_path):
    """OpenAI's original release is TorchScript: reading it means running its code."""
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(tmp_path / "ViT-B-32.pt"))
    with pytest.raises(ModelFormatError, match="TorchScript archive .* use the Hugging Face or open_clip copy"):
        vlkit.load_model(tmp_path / "ViT-B-32.pt")


def test_everything_else_fails_naming_the_path_and_what_was_found(tmp_path, tiny_clip):
    with pytest.raises(ModelFormatError, match="no such file or directory"):
        vlkit.load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFormatError, match=r"empty: no config.json .* it is empty"):
        vlkit.load_model(tmp_path / "empty")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.md").write_text("hello")
    with pytest.raises(ModelFormatError, match="it holds README.md"):
        vlkit.load_model(tmp_path / "notes")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(ModelFormatError, match=r"model_type='bert', architectures=\['BertModel'\]"):
        vlkit.load_model(tmp_path / "bert")
    (tmp_path / "junk.bin").write_bytes(b"\x00\x01 not a checkpoint")
    with pytest.raises(ModelFormatError, match="junk.bin"):
        vlkit.load_model(tmp_path / "junk.bin")
    save_file({"encoder.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ModelFormatError, match=r"no known layout; its 1 keys begin \['encoder.weight'\]"):
        vlkit.load_model(tmp_path / "other.safetensors")


def test_weights_without_their_directory_say_so(tmp_path, tiny_clip):
    build_hf(tmp_path / "hf", tokenizer=False)
    with pytest.raises(ModelFormatError, match="pass the directory"):
        vlkit.load_model(tmp_path / "hf" / "model.safetensors")
    vlkit.save_model(tiny_clip, tmp_path / "vl")
    with pytest.raises(ModelFormatError, match="vlkit weights: pass the model directory"):
        vlkit.load_model(tmp_path / "vl" / "model.safetensors")


def test_hf_wins_over_open_clip_when_a_directory_holds_both(tmp_path, tiny_clip):
    """The Hub's LAION repositories ship both layouts side by side; either loads the same weights."""
    build_hf(tmp_path / "both", tokenizer=False)
    save_open_clip(tiny_clip, tmp_path / "oc")
    for f in (tmp_path / "oc").iterdir():
        shutil.copy(f, tmp_path / "both" / f.name)
    assert detect_format(tmp_path / "both")[0] == "hf"
