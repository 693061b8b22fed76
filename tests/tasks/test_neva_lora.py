"""NeVA with LoRA (model.peft.lora): the base model's logits at init, only adapters (+ the projector) in the optimizer
and in checkpoints, training moves the loss, bitwise-exact resume, the merged export (and ``vlkit convert
--merge-lora``) equal to the adapted model, and FSDP2 / tensor parallel on 2 gloo ranks equal to one process."""

import json
import sys
from pathlib import Path

import pytest
import safetensors
import torch
from safetensors.torch import load_file

from vlkit.config import load_config
from vlkit.data.shapes_vqa import write_shapes_vqa
from vlkit.interop.native import load_model
from vlkit.nn.lora import has_lora, is_adapter_key
from vlkit.tasks import task_for
from vlkit.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")
LORA = ["model.peft.lora.rank=4", "model.peft.lora.alpha=8", "model.peft.lora.dropout=0.1"]
WORKER = Path(__file__).with_name("lora_worker.py")


def config(root, name, *extra):
    return load_config("neva-tiny-finetune", [
        f"data.train_path={root}/data/instruct_train.json",
        f"trainer.output_dir={root}/{name}",
        "trainer.max_steps=4",
        "trainer.micro_batch_size=4",
        "trainer.accelerator=cpu",
        "trainer.logging.tensorboard=false",
        "trainer.logging.log_every_n_steps=1",
        "trainer.checkpoint.every_n_steps=2",
        "trainer.checkpoint.keep_last=3",
        "data.num_workers=0",
        f"model.mm_cfg.vision_encoder.from_pretrained={root}/clip",
        f"model.mm_cfg.llm.from_pretrained={root}/llama",
        "model.mm_cfg.pretrain_mm_mlp_adapter=null",
        "optim.lr=1e-2",
        *extra,
    ])  # fmt: skip


def first_batch(trainer):
    return next(iter(trainer.loader))


@pytest.fixture(scope="module")
def run(root):
    trainer = Trainer(config(root, "lora", *LORA), task_for("neva"))
    batch = first_batch(trainer)
    with torch.no_grad():
        initial = trainer.model.eval()(batch["input_ids"], batch["images"], batch["attention_mask"], batch["labels"])
    history = trainer.fit()
    return trainer, history, batch, initial["logits"]


def test_lora_at_init_gives_the_base_models_logits(root, run):
    _, _, batch, lora_logits = run
    base = Trainer(config(root, "base"), task_for("neva"))
    assert not has_lora(base.model)
    with torch.no_grad():
        out = base.model.eval()(batch["input_ids"], batch["images"], batch["attention_mask"], batch["labels"])
    assert torch.equal(out["logits"], lora_logits)


def test_only_adapters_and_the_projector_train_and_are_checkpointed(root, run):
    trainer, history, _, _ = run
    model = trainer.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapters = {n for n in trainable if is_adapter_key(n)}
    assert len(adapters) == 2 * 5 * 2  # A and B on qkv, proj, gate, up, down of both LLM blocks
    assert trainable == adapters | {n for n, _ in model.named_parameters() if n.startswith("projector.")}
    ids = {id(p): n for n, p in model.named_parameters()}
    assert {ids[id(p)] for g in trainer.optimizer.param_groups for p in g["params"]} == trainable
    assert {ids[id(p)] for p in trainer.optimizer.state} == trainable
    # The LLM trains (its adapters' dropout is on); the frozen vision tower stays in eval mode.
    trainer.task.set_train_mode(model)
    assert model.llm.training and not model.vision_tower.training
    step = (root / "lora" / "checkpoints" / "latest").read_text().strip()
    ckpt = root / "lora" / "checkpoints" / step
    with safetensors.safe_open(ckpt / "model.safetensors", "pt") as f:
        assert set(f.keys()) == trainable
    assert json.loads((ckpt / "train_state.json").read_text())["partial_model"] is True
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == 4 and losses[-1] < losses[0]


def test_resume_is_bitwise_exact(root, run):
    trainer, _, _, _ = run
    step2 = root / "lora" / "checkpoints" / "step_00000002"
    assert step2.is_dir()
    resumed = Trainer(config(root, "lora-resumed", *LORA, f"trainer.checkpoint.resume={step2}"), task_for("neva"))
    resumed.fit()
    assert resumed.step == 4
    theirs = dict(trainer.model.named_parameters())
    for name, p in resumed.model.named_parameters():
        assert torch.equal(p, theirs[name]), name


def test_the_exported_model_is_merged_and_equals_the_adapted_one(root, run):
    trainer, _, batch, _ = run
    exported = load_model(root / "lora" / "model")
    assert not has_lora(exported) and exported.config.peft is None
    assert not any(is_adapter_key(k) for k in load_file(root / "lora" / "model" / "model.safetensors"))
    model = trainer.model.eval()
    with torch.no_grad():
        ours = model(batch["input_ids"], batch["images"], batch["attention_mask"], batch["labels"])["logits"]
        theirs = exported.eval()(batch["input_ids"], batch["images"], batch["attention_mask"], batch["labels"])
    torch.testing.assert_close(theirs["logits"], ours, rtol=1e-5, atol=1e-5)
    assert not torch.equal(exported.llm.transformer.blocks[0].attn.qkv.weight,
                           load_model(root / "llama").llm.transformer.blocks[0].attn.qkv.weight)  # fmt: skip


def test_convert_merge_lora_writes_the_merged_model(root, run, capsys):
    from vlkit.cli import main

    ckpt = root / "lora" / "checkpoints" / "step_00000004"
    assert main(["convert", "--merge-lora", str(ckpt), "--out", str(root / "merged")]) == 0
    merged = load_file(root / "merged" / "model.safetensors")
    exported = load_file(root / "lora" / "model" / "model.safetensors")
    assert merged.keys() == exported.keys()
    for k in merged:
        torch.testing.assert_close(merged[k], exported[k], rtol=0, atol=1e-6)
    # The run directory itself (its latest checkpoint, adapters and all) loads as the same merged model, so every
    # --model (vlkit chat, eval, serve) takes a LoRA run as it takes any other.
    from_run = load_model(root / "lora")
    assert not has_lora(from_run) and from_run.config.peft is None
    for k, v in from_run.state_dict().items():
        torch.testing.assert_close(v, exported[k], rtol=0, atol=1e-6)
    # A model without adapters is refused, naming the problem.
    assert main(["convert", "--merge-lora", str(root / "llama"), "--out", str(root / "nothing")]) == 2
    assert "holds no LoRA adapters" in capsys.readouterr().err


def test_fsdp_and_tensor_parallel_equal_one_process(tmp_path, torchrun):
    import subprocess

    data = tmp_path / "data"
    write_shapes_vqa(data, train=32, val=4, progress=False)
    out = tmp_path / "runs"
    single = subprocess.run([sys.executable, str(WORKER), str(data), str(out), "single"], capture_output=True,
                            text=True, check=False)  # fmt: skip
    assert single.returncode == 0, single.stderr[-4000:]
    torchrun(WORKER, 2, str(data), str(out), "fsdp", "tp", timeout=600)
    ref_losses = json.loads((out / "single" / "losses.json").read_text())
    ref = load_file(out / "single" / "final.safetensors")
    ref_export = load_file(out / "single" / "model" / "model.safetensors")
    for layout in ("fsdp", "tp"):
        losses = json.loads((out / layout / "losses.json").read_text())
        assert losses == pytest.approx(ref_losses, rel=1e-5), layout
        final = load_file(out / layout / "final.safetensors")
        assert final.keys() == ref.keys() and any(is_adapter_key(k) for k in final)
        for k in ref:
            torch.testing.assert_close(final[k], ref[k], rtol=1e-5, atol=1e-6, msg=f"{layout}: {k}")
        export = load_file(out / layout / "model" / "model.safetensors")  # merged from the sharded model
        assert export.keys() == ref_export.keys()
        for k in ref_export:
            torch.testing.assert_close(export[k], ref_export[k], rtol=1e-5, atol=1e-6, msg=f"{layout}: {k}")
