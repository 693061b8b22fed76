import json
import subprocess
import sys

import pytest

from vlkit.cli import main


def test_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for command in ("info", "train", "eval", "convert", "chat", "data", "bench", "demo"):
        assert command in out


@pytest.mark.parametrize("command", ["info", "train", "eval", "convert", "chat", "data", "bench", "demo"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0


def test_info_json_reports_towers(capsys):
    assert main(["info", "clip-l14", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["parameters"]["vision"] == 303_966_208
    assert report["parameters"]["text"] == 123_650_304
    assert report["flops_per_sample"]["image"]["forward"] > 1.5e11
    assert report["config"]["model"]["vision"]["patch_dim"] == 14


def test_info_text_with_overrides(capsys):
    assert main(["info", "vit-tiny", "model.vision.num_layers=3", "--no-config"]) == 0
    out = capsys.readouterr().out
    assert "vit_classifier" in out and "total" in out


def test_info_unknown_key_exits_2(capsys):
    assert main(["info", "clip-b16", "model.vision.hiden_size=3"]) == 2
    err = capsys.readouterr().err
    assert "hiden_size" in err and "did you mean hidden_size" in err


def test_info_invalid_combination_exits_2(capsys):
    assert main(["info", "clip-b16", "model.vision.img_h=230"]) == 2
    assert "model.vision.img_h=230" in capsys.readouterr().err


def test_chat_without_a_model_exits_2(capsys):
    assert main(["chat", "--model", "no-such-model", "--image", "no-such.png"]) == 2
    assert "no-such.png: no such file" in capsys.readouterr().err


def test_bad_usage_exits_2():
    with pytest.raises(SystemExit) as e:
        main(["no-such-command"])
    assert e.value.code == 2


def test_python_dash_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "vlkit", "--version"], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and "vlkit" in result.stdout
