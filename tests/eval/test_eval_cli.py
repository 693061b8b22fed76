import argparse
import json

import pytest

from vlkit.eval.cli import main, register

COMMANDS = ("zeroshot", "retrieval", "classify")


@pytest.mark.parametrize("command", COMMANDS)
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert "--model" in capsys.readouterr().out


def test_register_adds_the_eval_group():
    parser = argparse.ArgumentParser(prog="vlkit")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "retrieval", "--model", "m", "--data", "d", "--recall-k", "1,3"])
    assert args.eval_task == "retrieval" and args.recall_k == (1, 3) and callable(args.func)


def test_missing_option_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["zeroshot", "--data", "x"])
    assert e.value.code == 2
    assert "--model" in capsys.readouterr().err


def test_missing_model_path_exits_2(tmp_path, shapes_dir, capsys):
    missing = tmp_path / "no-such-model"
    assert main(["zeroshot", "--model", str(missing), "--data", str(shapes_dir)]) == 2
    err = capsys.readouterr().err
    assert "--model" in err and str(missing) in err


def test_missing_data_path_exits_2(tmp_path, clip_dir, capsys):
    missing = tmp_path / "no-such-data"
    for command in ("zeroshot", "retrieval"):
        assert main([command, "--model", str(clip_dir), "--data", str(missing), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert "--data" in err and str(missing) in err


def test_not_a_model_and_wrong_model_kind_exit_2(tmp_path, clip_dir, shapes_folder, capsys):
    assert main(["classify", "--model", str(tmp_path), "--data", str(shapes_folder)]) == 2
    assert "config.json" in capsys.readouterr().err
    assert main(["classify", "--model", str(clip_dir), "--data", str(shapes_folder), "--quiet"]) == 2
    assert "zeroshot" in capsys.readouterr().err


def test_unlabelled_shards_exit_2(tmp_path, clip_dir, shapes_dir, capsys):
    # Retrieval-only data (no .cls member) for zero-shot: the message says what is missing.
    import shutil
    import tarfile

    src, dst = shapes_dir / "val" / "000000.tar", tmp_path / "nolabels.tar"
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for member in tin.getmembers():
            if not member.name.endswith(".cls"):
                tout.addfile(member, tin.extractfile(member))
    shutil.copy(shapes_dir / "classes.json", tmp_path / "classes.json")
    assert main(["zeroshot", "--model", str(clip_dir), "--data", str(dst), "--quiet", "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert "no usable samples" in err and "no_label=40" in err


def test_zeroshot_json(clip_dir, shapes_dir, tmp_path, capsys):
    out = tmp_path / "r" / "zs.json"
    argv = ["zeroshot", "--model", str(clip_dir), "--data", str(shapes_dir), "--json", "--quiet", "--workers", "0",
            "--templates", "simple", "--output", str(out)]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) >= {"dataset", "model", "pretrained", "task", "metrics", "language"}
    assert result["task"] == "zeroshot_classification" and result["model"] == "clip-tiny"
    assert result["dataset"] == str(shapes_dir)
    assert set(result["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    assert all(0.0 <= v <= 1.0 for v in result["metrics"].values())
    assert result["vlkit"]["num_samples"] == 40 and result["vlkit"]["num_templates"] == 1
    assert json.loads(out.read_text()) == result


def test_retrieval_json(clip_dir, shapes_dir, capsys):
    argv = ["retrieval", "--model", str(clip_dir), "--data", str(shapes_dir / "val"), "--json", "--quiet",
            "--workers", "0", "--chunk-size", "7", "--dataset-name", "shapes-val"]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["task"] == "zeroshot_retrieval" and result["dataset"] == "shapes-val"
    for k in (1, 5, 10):
        for direction in ("image", "text"):
            assert 0.0 <= result["metrics"][f"{direction}_retrieval_recall@{k}"] <= 1.0
    assert result["metrics"]["text_retrieval_mean_rank"] >= 1.0


def test_classify_text_output(vit_dir, shapes_folder, capsys):
    argv = ["classify", "--model", str(vit_dir), "--data", str(shapes_folder), "--quiet", "--workers", "0"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("classification") and "acc1" in out and "mean_per_class_recall" in out


def test_model_path_follows_the_latest_checkpoint(tmp_path):
    from vlkit.interop.native import resolve_model_path

    step = tmp_path / "run" / "checkpoints" / "step_00000600"
    step.mkdir(parents=True)
    (step / "config.json").write_text("{}")
    # The marker that makes it a complete checkpoint (it lists every other file at its size).
    marker = {"format": "vlkit-checkpoint", "version": 1, "files": {"config.json": 2}}
    (step / "train_state.json").write_text(json.dumps(marker))
    (step.parent / "latest").write_text("step_00000600\n")
    assert resolve_model_path(str(tmp_path / "run")) == str(step)
    assert resolve_model_path(str(step.parent)) == str(step)
    assert resolve_model_path(str(step)) == str(step)
    # The same rule as resuming: a pointer at an incomplete checkpoint falls back to the newest complete one.
    newer = step.with_name("step_00000700")
    newer.mkdir()
    (newer / "train_state.json").write_text(json.dumps({**marker, "files": {"model.safetensors": 10}}))
    (step.parent / "latest").write_text("step_00000700\n")
    assert resolve_model_path(str(tmp_path / "run")) == str(step)


def test_a_clip_benchmark_folder_brings_its_class_names_and_templates(clip_dir, shapes_dir, tmp_path, capsys):
    # CLIP_benchmark's layout: classnames.txt and zeroshot_classification_templates.txt at the root, shards in test/.
    import shutil

    root = tmp_path / "cb"
    (root / "test").mkdir(parents=True)
    shutil.copy(shapes_dir / "val" / "000000.tar", root / "test" / "0.tar")
    names = json.loads((shapes_dir / "classes.json").read_text())["classes"]
    (root / "classnames.txt").write_text("\n".join(names) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\na drawing of a {c}.\n")
    argv = ["zeroshot", "--model", str(clip_dir), "--data", str(root / "test"), "--quiet", "--workers", "0"]
    assert main([*argv, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)["vlkit"]
    assert info["num_classes"] == len(names) == 25 and info["classes"] == str(root / "classnames.txt")
    assert info["num_templates"] == 2 and info["templates"] == str(root / "zeroshot_classification_templates.txt")
    assert main(argv) == 0  # the text report says where the class names came from
    assert f"25 classes ({root / 'classnames.txt'})" in capsys.readouterr().out
