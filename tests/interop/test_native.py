import json
import os

import pytest
import torch

import vlkit
from vlkit.interop.native import ModelFormatError, atomic_write_dir, load_state_dict


def test_save_load_round_trip_is_bit_identical(tmp_path):
    torch.manual_seed(0)
    model = vlkit.create_model("clip-tiny", vision__activation="quick_gelu")
    vlkit.save_model(model, tmp_path / "m")
    loaded = vlkit.load_model(tmp_path / "m")
    assert loaded.config == model.config
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["format"] == "vlkit" and config["model"]["vision"]["activation"] == "quick_gelu"


def test_compiled_prefix_is_stripped(tmp_path):
    model = vlkit.create_model("vit-tiny")
    wrapper = torch.nn.Module()
    wrapper._orig_mod = model  # what torch.compile's OptimizedModule looks like from outside
    vlkit.save_model(wrapper, tmp_path / "m")
    assert not any("_orig_mod" in k for k in load_state_dict(tmp_path / "m"))


def test_load_at_new_resolution(tmp_path):
    vlkit.save_model(vlkit.create_model("vit-tiny"), tmp_path / "m")
    big = vlkit.load_model(tmp_path / "m", vision__img_h=64, vision__img_w=64)
    assert big(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_crash_mid_save_keeps_the_last_good_copy(tmp_path):
    target = tmp_path / "m"
    vlkit.save_model(vlkit.create_model("vit-tiny"), target)
    before = (target / "model.safetensors").read_bytes()

    def broken(tmp):
        (tmp / "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_dir(target, broken)
    assert (target / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary directory left behind


def test_clear_errors_for_things_that_are_not_models(tmp_path):
    with pytest.raises(ModelFormatError, match="no config.json"):
        vlkit.load_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelFormatError, match="not valid JSON"):
        vlkit.load_model(tmp_path)
    (tmp_path / "config.json").write_text('{"format": "hf"}')
    with pytest.raises(ModelFormatError, match="not a vlkit model config"):
        vlkit.load_model(tmp_path)


def test_mismatched_weights_are_reported(tmp_path):
    vlkit.save_model(vlkit.create_model("vit-tiny"), tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["model"]["vision"]["num_layers"] = 3
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFormatError, match="missing"):
        vlkit.load_model(tmp_path / "m")


@pytest.mark.parametrize("umask", [0o022, 0o007])
def test_written_files_honour_the_umask(tmp_path, umask):
    from vlkit.interop.hf import save_hf
    from vlkit.interop.open_clip import save_open_clip
    from vlkit.train.checkpoint import CheckpointManager

    model = vlkit.create_model("clip-tiny", vision__num_layers=1, text__num_layers=1)
    old = os.umask(umask)
    try:
        vlkit.save_model(model, tmp_path / "model")
        save_hf(model, tmp_path / "hf")
        save_open_clip(model, tmp_path / "open_clip")
        CheckpointManager(tmp_path / "run" / "checkpoints").save(3, model, None)
    finally:
        os.umask(old)
    files = [f for f in tmp_path.rglob("*") if f.is_file()]
    assert sum(f.suffix == ".safetensors" for f in files) >= 4  # safetensors' own writer makes these 0600
    assert {str(f.relative_to(tmp_path)): oct(f.stat().st_mode & 0o777) for f in files} == {
        str(f.relative_to(tmp_path)): oct(0o666 & ~umask) for f in files
    }
