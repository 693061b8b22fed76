"""Every parallel layout ends in a usable model: a sharded (DCP) checkpoint of an FSDP x TP run loads whole in a plain
process, the trainer exports ``<output_dir>/model``, ``vlkit convert`` takes the run directory, and loaders follow the
trainer's rule for the latest complete checkpoint. NeVA stage 1 (partial checkpoints) exports the whole model."""

from __future__ import annotations

import importlib.util
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import vlkit
from vlkit.cli import main
from vlkit.interop.checkpoint_files import latest_checkpoint, read_train_state
from vlkit.interop.native import ModelFormatError, load_state_dict, read_weights_file
from vlkit.train.checkpoint import CheckpointManager

pytestmark = pytest.mark.usefixtures("one_thread")

HERE = Path(__file__).parent
WORKER = HERE / "consolidate_worker.py"


def features(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 509, (3, 77), generator=g)
    ids[:, 0], ids[:, 7] = 510, 511
    with torch.no_grad():
        return model.encode_image(torch.randn(3, 3, 32, 32, generator=g)), model.encode_text(ids)


def assert_same_weights(model: torch.nn.Module, reference: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == reference.keys()
    for k, v in reference.items():
        assert torch.equal(state[k], v), k


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """clip-tiny trained 2 steps on 4 gloo ranks, FSDP 2 x TP 2, a checkpoint after each step (both kept), and the
    full state dict the run gathered at its end (``final.safetensors``)."""
    # The `torchrun` fixture is function-scoped; its launcher, from the top conftest (`conftest` alone is ambiguous:
    # tests/eval has one too).
    spec = importlib.util.spec_from_file_location("top_conftest", HERE.parent / "conftest.py")
    top_conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(top_conftest)

    out = tmp_path_factory.mktemp("fsdp-tp")
    overrides = ["parallel.fsdp=true", "parallel.tensor_parallel_size=2", "trainer.max_steps=2",
                 "trainer.checkpoint.every_n_steps=1", "trainer.checkpoint.keep_last=0"]  # fmt: skip
    top_conftest.run_torchrun(WORKER, 4, str(out), *overrides, timeout=420)
    return out


@pytest.fixture(scope="module")
def final(run) -> dict[str, torch.Tensor]:
    return read_weights_file(run / "final.safetensors")


@pytest.mark.slow
def test_a_sharded_checkpoint_loads_whole_in_one_process(run, final):
    step = run / "checkpoints" / "step_00000002"
    info = read_train_state(step)
    assert info["kind"] == "sharded" and info["world_size"] == 4
    assert not (step / "model.safetensors").exists()
    model = vlkit.load_model(run)  # the run directory: its latest complete checkpoint
    assert not dist.is_initialized()  # no process group was needed
    assert_same_weights(model, final)
    reference = vlkit.create_model(model.config)
    reference.load_state_dict(final)
    for got, want in zip(features(model), features(reference)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert_same_weights(vlkit.load_model(run / "checkpoints"), final)  # the checkpoints folder: the same


@pytest.mark.slow
def test_training_exports_the_whole_model(run, final):
    exported = run / "model"
    config = json.loads((exported / "config.json").read_text())
    assert config["format"] == "vlkit" and config["step"] == 2
    state = load_state_dict(exported)
    assert state.keys() == final.keys()
    for k, v in final.items():
        assert torch.equal(state[k], v), k
    for got, want in zip(features(vlkit.load_model(exported)), features(vlkit.load_model(run))):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*vocab_size=512")  # the test's tiny vocabulary has no tokenizer of its own
def test_convert_takes_the_run_directory(run, tmp_path, capsys):
    assert main(["convert", "--to", "hf", str(run), "--out", str(tmp_path / "hf")]) == 0
    assert "(checkpoint) -> " in capsys.readouterr().out
    back = vlkit.load_model(tmp_path / "hf")
    for got, want in zip(features(back), features(vlkit.load_model(run))):
        torch.testing.assert_close(got, want)


@pytest.mark.slow
def test_latest_at_an_incomplete_checkpoint_falls_back_for_load_model_too(run, final, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run / "checkpoints", copy / "checkpoints")
    shard = next((copy / "checkpoints" / "step_00000002").glob("__1_*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-7])  # a torn write: the marker's size no longer matches
    assert (copy / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    assert latest_checkpoint(copy / "checkpoints").name == "step_00000001"
    assert CheckpointManager(copy / "checkpoints").latest().name == "step_00000001"  # one rule for both
    model = vlkit.load_model(copy)
    assert_same_weights(model, vlkit.load_model(copy / "checkpoints" / "step_00000001").state_dict())
    assert any(not torch.equal(v, final[k]) for k, v in model.state_dict().items())  # step 1's weights, not step 2's
    with pytest.raises(ModelFormatError, match=r"__1_0\.distcp has \d+ bytes"):
        vlkit.load_model(copy / "checkpoints" / "step_00000002")  # named explicitly: refused, naming the file


# ------------------------------------------------------------------------------------------ one process, no torchrun


def test_sharded_format_written_by_one_process_loads_as_a_model(tmp_path):
    torch.manual_seed(0)
    model = vlkit.create_model("clip-tiny", text__vocab_size=512, text__eot_token_id=511)
    path = CheckpointManager(tmp_path).save(3, model, None, state={"step": 3}, sharded=True)
    assert (path / ".metadata").is_file() and (path / "config.json").is_file()
    loaded = vlkit.load_model(path)
    assert_same_weights(loaded, model.state_dict())
    for got, want in zip(features(loaded), features(model)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_sharded_checkpoint_without_config_json_takes_the_run_config(tmp_path):
    """Sharded checkpoints written before they carried config.json: the model config in train_state.json names the
    architecture (tuples in it were encoded, and come back decoded)."""
    torch.manual_seed(0)
    model = vlkit.create_model("clip-tiny", text__vocab_size=512, text__eot_token_id=511)
    run_config = {"model": asdict(model.config)}
    path = CheckpointManager(tmp_path).save(1, model, None, state={"config": run_config}, sharded=True)
    info = json.loads((path / "train_state.json").read_text())
    (path / "config.json").unlink()
    del info["files"]["config.json"]
    (path / "train_state.json").write_text(json.dumps(info))
    assert_same_weights(vlkit.load_model(tmp_path), model.state_dict())


def test_a_partial_checkpoint_that_cannot_be_completed_says_so(tmp_path):
    model = vlkit.create_model("clip-tiny", text__vocab_size=512, text__eot_token_id=511)
    keys = {k for k in model.state_dict() if k.startswith("visual.")}
    for sharded in (False, True):
        CheckpointManager(tmp_path / str(sharded)).save(1, model, None, sharded=sharded, model_keys=keys)
        with pytest.raises(ModelFormatError, match=r"part of the model only \(partial_model: true\)"):
            vlkit.load_model(tmp_path / str(sharded))


def test_a_run_without_a_complete_checkpoint_names_it(tmp_path):
    (tmp_path / "checkpoints" / "step_00000001").mkdir(parents=True)
    (tmp_path / "checkpoints" / "latest").write_text("step_00000001\n")
    with pytest.raises(ModelFormatError, match=r"no complete checkpoint .*train_state\.json is missing"):
        vlkit.load_model(tmp_path)
    code = main(["convert", "--to", "hf", str(tmp_path), "--out", str(tmp_path.parent / "hf-out")])
    assert code == 2


# ------------------------------------------------------------------------------------------------------------- NeVA


def test_neva_stage1_exports_a_whole_model_usable_alone(tmp_path, monkeypatch):
    """Stage 1 checkpoints hold the projector only; ``<output_dir>/model`` holds everything, frozen towers too, so it
    loads after the pretrained parts are gone, while the partial checkpoint then fails with a clear message."""
    from vlkit.config import load_config
    from vlkit.data.shapes_vqa import write_shapes_vqa
    from vlkit.interop.native import save_model
    from vlkit.tasks import task_for
    from vlkit.train.trainer import Trainer

    monkeypatch.setattr("vlkit.tasks.neva.EVAL_MAX_QUESTIONS", 2)
    write_shapes_vqa(tmp_path / "data", train=12, val=2, progress=False)
    torch.manual_seed(1)
    save_model(vlkit.create_model("clip-tiny"), tmp_path / "clip")
    save_model(vlkit.create_model("llama-tiny"), tmp_path / "llama")
    cfg = load_config("neva-tiny-pretrain", [
        f"data.train_path={tmp_path}/data/pretrain_train.json", f"trainer.output_dir={tmp_path}/run",
        "trainer.max_steps=3", "trainer.micro_batch_size=4", "trainer.accelerator=cpu", "data.num_workers=0",
        "trainer.logging.tensorboard=false", f"model.mm_cfg.vision_encoder.from_pretrained={tmp_path}/clip",
        f"model.mm_cfg.llm.from_pretrained={tmp_path}/llama",
    ])  # fmt: skip
    trainer = Trainer(cfg, task_for("neva"))
    trainer.fit()
    trained = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    assert read_train_state(tmp_path / "run" / "checkpoints" / "step_00000003")["partial_model"] is True

    shutil.rmtree(tmp_path / "clip")
    shutil.rmtree(tmp_path / "llama")
    exported = vlkit.load_model(tmp_path / "run" / "model")
    assert_same_weights(exported, trained)
    with pytest.raises(ModelFormatError, match="part of the model only .* model directory"):
        vlkit.load_model(tmp_path / "run")


def test_save_model_false_writes_no_model(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    from consolidate_worker import BASE, SameBatchCLIPTask

    from vlkit.config import load_config
    from vlkit.train.trainer import Trainer

    cfg = load_config("clip-tiny", [*BASE, f"trainer.output_dir={tmp_path}", "trainer.max_steps=1",
                                    "trainer.save_model=false"])  # fmt: skip
    trainer = Trainer(cfg, SameBatchCLIPTask)
    trainer.fit()
    assert trainer.export_model() is None
    assert not (tmp_path / "model").exists() and (tmp_path / "checkpoints" / "latest").is_file()
