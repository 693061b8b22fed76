"""``vlkit convert`` through ``vlkit.cli.main``: every direction, and exit 2 with a named problem on bad usage."""

import json

import pytest
import torch
from hf_models import build_hf, inputs, perturbed
from safetensors.torch import load_file, save_file
from transformers import CLIPModel

import vlkit
from vlkit.cli import main
from vlkit.interop.cli import matching_preset
from vlkit.interop.open_clip import open_clip_config, to_open_clip_state_dict
from vlkit.models.factory import resolve_model_config


@pytest.fixture(scope="module")
def hf_src(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    return build_hf(path), path


@pytest.fixture(scope="module")
def tiny_clip():
    torch.manual_seed(0)
    model = vlkit.create_model("clip-tiny", vision__activation="quick_gelu", text__activation="quick_gelu")
    return perturbed(model, seed=5)


def _same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_from_hf_writes_a_vlkit_directory(hf_src, tmp_path, capsys):
    hf, src = hf_src
    assert main(["convert", "--from", "hf", str(src), "--out", str(tmp_path / "out")]) == 0
    assert f"(hf) -> {tmp_path / 'out'} (vlkit)" in capsys.readouterr().out
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert names == {"config.json", "model.safetensors", "vocab.json", "merges.txt"}
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["format"] == "vlkit" and config["converted_from"]["format"] == "hf"
    model = vlkit.load_model(tmp_path / "out").eval()
    pixels, ids = inputs()
    with torch.no_grad():
        a = hf.get_image_features(pixel_values=pixels).pooler_output
        b = hf.get_text_features(input_ids=ids).pooler_output
        assert (a - model.encode_image(pixels)).abs().max() < 1e-5
        assert (b - model.encode_text(ids)).abs().max() < 1e-5


def test_to_hf_and_back_through_the_cli(hf_src, tmp_path):
    """hf -> vlkit -> hf gives the source tensors bit for bit, and transformers loads the result."""
    _, src = hf_src
    assert main(["convert", "--from", "hf", str(src), "--out", str(tmp_path / "vl")]) == 0
    assert main(["convert", "--to", "hf", str(tmp_path / "vl"), "--out", str(tmp_path / "back")]) == 0
    _same(load_file(src / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors"))
    assert CLIPModel.from_pretrained(tmp_path / "back").config.projection_dim == 24


def test_open_clip_both_ways(tiny_clip, tmp_path):
    """vlkit -> open_clip directory -> vlkit, and a bare open_clip checkpoint with its config JSON."""
    vlkit.save_model(tiny_clip, tmp_path / "vl")
    assert main(["convert", "--to", "open_clip", str(tmp_path / "vl"), "--out", str(tmp_path / "oc")]) == 0
    assert main(["convert", "--from", "open_clip", str(tmp_path / "oc"), "--out", str(tmp_path / "back")]) == 0
    _same(tiny_clip.state_dict(), vlkit.load_model(tmp_path / "back").state_dict())

    save_file(to_open_clip_state_dict(tiny_clip), str(tmp_path / "epoch_3.safetensors"))
    (tmp_path / "model.json").write_text(json.dumps(open_clip_config(tiny_clip)))
    args = [
        "convert",
        "--from",
        "open_clip",
        str(tmp_path / "epoch_3.safetensors"),
        "--config",
        str(tmp_path / "model.json"),
    ]
    assert main([*args, "--out", str(tmp_path / "bare")]) == 0
    loaded = vlkit.load_model(tmp_path / "bare")
    assert loaded.config.vision.activation == "quick_gelu"
    _same(tiny_clip.state_dict(), loaded.state_dict())


def test_from_hf_to_open_clip_in_one_step(hf_src, tmp_path, capsys):
    # open_clip tokenizes with CLIP's BPE only: a model with its own vocabulary is refused, naming why.
    _, src = hf_src
    assert main(["convert", "--from", "hf", str(src), "--to", "open_clip", "--out", str(tmp_path / "no")]) == 2
    assert "model.text.tokenizer" in capsys.readouterr().err
    hf = build_hf(tmp_path / "hf", tokenizer=False)  # no tokenizer files: CLIP's BPE is assumed
    with pytest.warns(UserWarning):  # the tiny vocabulary, transformers' crop style: both are reported
        assert (
            main(["convert", "--from", "hf", str(tmp_path / "hf"), "--to", "open_clip", "--out", str(tmp_path / "oc")])
            == 0
        )
    model = vlkit.load_model(tmp_path / "oc").eval()
    pixels, _ = inputs()
    with torch.no_grad():
        assert (
            hf.get_image_features(pixel_values=pixels).pooler_output - model.encode_image(pixels)
        ).abs().max() < 1e-5


def test_usage_errors_exit_2_naming_the_problem(hf_src, tmp_path, capsys):
    _, src = hf_src
    out = str(tmp_path / "out")
    (tmp_path / "empty").mkdir()
    cases = [
        (["convert", str(tmp_path / "empty"), "--out", out], "--from hf|open_clip|llava"),  # no format in the content
        (["convert", "--from", "llava", str(src), "--out", out], "not a Hugging Face LLaVA config"),
        (
            ["convert", "--from", "hf", str(src), "--model-name", "ViT-B-32", "--out", out],
            "use them with --from open_clip",
        ),
        (["convert", "--from", "hf", str(tmp_path / "nope"), "--out", out], "no such file or directory"),
        (["convert", "--from", "hf", str(src), "--out", str(src / "inside")], "overlaps the source"),
        (["convert", "--from", "open_clip", str(src), "--out", out], "open_clip"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    vlkit.save_model(vlkit.create_model("vit-tiny"), tmp_path / "vit")
    assert main(["convert", "--from", "hf", str(tmp_path / "vit"), "--out", out]) == 2
    assert "not a Hugging Face CLIP config" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["convert", "--from", "tensorflow", str(src), "--out", out])
    assert e.value.code == 2


def test_an_existing_output_needs_force(hf_src, tmp_path, capsys):
    _, src = hf_src
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["convert", "--from", "hf", str(src), "--out", str(out)]) == 2
    assert "pass --force" in capsys.readouterr().err and (out / "keep.txt").is_file()
    assert main(["convert", "--from", "hf", str(src), "--out", str(out), "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_a_failed_conversion_leaves_no_output(tmp_path, capsys):
    model = vlkit.create_model("clip-tiny", vision__img_w=48)  # non-square: transformers CLIP cannot hold it
    vlkit.save_model(model, tmp_path / "vl")
    assert main(["convert", "--to", "hf", str(tmp_path / "vl"), "--out", str(tmp_path / "hf")]) == 2
    assert "square" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vl"]


def test_matching_preset_names_the_quick_gelu_difference():
    """OpenAI's ViT-B/32 is the clip-b32 network with QuickGELU (and transformers' crop)."""
    cfg = resolve_model_config(
        "clip-b32", vision__activation="quick_gelu", text__activation="quick_gelu", vision__crop_style="hf"
    )
    name, diffs = matching_preset(cfg)
    assert name == "clip-b32"
    assert diffs == [
        "model.vision.activation=quick_gelu (preset: gelu)",
        "model.vision.crop_style=hf (preset: openai)",
        "model.text.activation=quick_gelu (preset: gelu)",
    ]
    assert matching_preset(resolve_model_config("clip-b32", vision__num_layers=6)) == (None, [])
    # LAION's ViT-H/14 has clip-h14's shapes with 16 vision heads of 80 (the specification's table says 20 of 64).
    assert matching_preset(resolve_model_config("clip-h14", vision__num_attention_heads=16)) == (
        "clip-h14",
        ["model.vision.num_attention_heads=16 (preset: 20)"],
    )


def test_without_from_or_to_the_source_is_recognised_by_content(hf_src, tiny_clip, tmp_path, capsys):
    _, src = hf_src
    assert main(["convert", str(src), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "recognised as hf by its content" in out and f"(hf) -> {tmp_path / 'out'} (vlkit)" in out
    assert json.loads((tmp_path / "out" / "config.json").read_text())["format"] == "vlkit"
    # A vlkit directory has nothing to become without --to; a folder of nothing is named with the way on.
    vlkit.save_model(tiny_clip, tmp_path / "vl")
    assert main(["convert", str(tmp_path / "vl"), "--out", str(tmp_path / "again")]) == 2
    assert "already a vlkit model directory; pass --to hf|open_clip" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["convert", str(tmp_path / "empty"), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "empty") in err and "--from hf|open_clip|llava" in err
    assert not (tmp_path / "again").exists() and not (tmp_path / "o2").exists()
