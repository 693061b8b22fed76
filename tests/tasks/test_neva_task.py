"""NeVA training task: what the optimizer holds in each stage, stage-1 checkpoints (projector only) and stage 2 loading
them, resuming a partial checkpoint, the tiny recipe's random towers carried from stage 1 to 2, the step-wide token
average, exact FLOPs, and a short run whose loss drops."""

import json

import pytest
import safetensors
import torch

from vlkit.config import load_config
from vlkit.interop.native import load_model
from vlkit.models import create_model
from vlkit.parallel.dist import DistInfo
from vlkit.tasks import task_for
from vlkit.tasks.neva import NevaTask
from vlkit.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def config(root, stage, name, *extra, pretrained=True):
    split = "pretrain" if stage == 1 else "instruct"
    overrides = [
        f"data.train_path={root}/data/{split}_train.json",
        f"trainer.output_dir={root}/{name}",
        "trainer.max_steps=2",
        "trainer.micro_batch_size=4",
        "trainer.accelerator=cpu",
        "trainer.logging.tensorboard=false",
        "trainer.logging.log_every_n_steps=1",
        "data.num_workers=0",
    ]
    if pretrained:
        overrides += [f"model.mm_cfg.vision_encoder.from_pretrained={root}/clip",
                      f"model.mm_cfg.llm.from_pretrained={root}/llama"]  # fmt: skip
    if stage == 2:
        overrides.append(f"model.mm_cfg.pretrain_mm_mlp_adapter={root}/stage1/checkpoints")
    return load_config(f"neva-tiny-{'pretrain' if stage == 1 else 'finetune'}", overrides + list(extra))


def checkpoint_keys(run_dir):
    step = (run_dir / "checkpoints" / "latest").read_text().strip()
    with safetensors.safe_open(run_dir / "checkpoints" / step / "model.safetensors", "pt") as f:
        return set(f.keys()), run_dir / "checkpoints" / step


def names(model, *prefixes):
    return {n for n, _ in model.named_parameters() if n.startswith(prefixes)}


def optimizer_names(trainer):
    ids = {id(p): n for n, p in trainer.model.named_parameters()}
    in_groups = {ids[id(p)] for g in trainer.optimizer.param_groups for p in g["params"]}
    with_state = {ids[id(p)] for p in trainer.optimizer.state}
    return in_groups, with_state


@pytest.fixture(scope="module")
def stage1(root):
    trainer = Trainer(config(root, 1, "stage1"), task_for("neva"))
    history = trainer.fit()
    return trainer, history


def test_task_for_neva():
    assert task_for("neva") is NevaTask


def test_stage1_trains_and_saves_the_projector_only(root, stage1):
    trainer, history = stage1
    model = trainer.model
    projector = names(model, "projector.")
    assert projector == {n for n, p in model.named_parameters() if p.requires_grad}
    in_groups, with_state = optimizer_names(trainer)
    assert in_groups == with_state == projector  # frozen towers: no optimizer state, not even in the groups
    trainer.task.set_train_mode(model)
    assert model.training and model.projector.training
    assert not model.vision_tower.training and not model.llm.training
    keys, ckpt = checkpoint_keys(root / "stage1")
    assert keys == projector
    assert json.loads((ckpt / "train_state.json").read_text())["partial_model"] is True
    saved = json.loads((ckpt / "config.json").read_text())["model"]
    assert saved["mm_cfg"]["llm"]["from_pretrained"] == f"{root}/llama"
    assert saved["llm"]["tokenizer"] == str((root / "data" / "tokenizer").resolve())
    # The trainer's metrics: tokens/s, skipped samples, and the held-out VQA evaluation at the end.
    assert history[-2]["tokens_per_s"] > 0 and history[-2]["skipped_samples"] == 0
    assert 0 <= history[-1]["eval/vqa/exact_match"] <= 1


def test_a_stage1_checkpoint_loads_over_its_pretrained_parts(root, stage1):
    _, ckpt = checkpoint_keys(root / "stage1")
    model = load_model(ckpt)
    clip, llama = load_model(root / "clip"), load_model(root / "llama")
    torch.testing.assert_close(model.llm.embed.weight, llama.llm.embed.weight, rtol=0, atol=0)
    torch.testing.assert_close(model.vision_tower.tower.patch_embed.proj.weight,
                               clip.visual.patch_embed.proj.weight, rtol=0, atol=0)  # fmt: skip
    torch.testing.assert_close(model.projector[0].weight, stage1[0].model.projector[0].weight, rtol=0, atol=0)


def test_resume_from_a_partial_checkpoint(root, stage1):
    cfg = config(root, 1, "stage1", "trainer.max_steps=3", "trainer.checkpoint.resume=latest")
    trainer = Trainer(cfg, task_for("neva"))
    assert trainer.resume("latest") and trainer.step == 2
    torch.testing.assert_close(trainer.model.projector[2].weight, stage1[0].model.projector[2].weight, rtol=0, atol=0)
    assert trainer.optimizer.state  # Adam's moments came back with the projector


def test_stage2_starts_from_the_stage1_projector_and_saves_projector_and_llm(root, stage1):
    trainer = Trainer(config(root, 2, "stage2", "model.mm_cfg.llm.freeze=false"), task_for("neva"))
    model = trainer.model
    torch.testing.assert_close(model.projector[0].weight, stage1[0].model.projector[0].weight, rtol=0, atol=0)
    trainable = names(model, "projector.", "llm.")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    trainer.fit()
    in_groups, with_state = optimizer_names(trainer)
    assert in_groups == with_state == trainable
    keys, ckpt = checkpoint_keys(root / "stage2")
    assert keys == trainable  # the frozen pretrained vision tower is left out
    assert json.loads((ckpt / "config.json").read_text())["model"]["mm_cfg"]["pretrain_mm_mlp_adapter"] is None
    loaded = load_model(ckpt)
    torch.testing.assert_close(loaded.llm.embed.weight, model.llm.embed.weight, rtol=0, atol=0)


def test_random_frozen_towers_are_saved_and_carried_to_stage2(root):
    """The tiny recipe: nothing pretrained. Stage 1 saves its random towers; stage 2 (another seed) reuses them."""
    Trainer(config(root, 1, "tiny1", "trainer.max_steps=1", pretrained=False), task_for("neva")).fit()
    keys, _ = checkpoint_keys(root / "tiny1")
    assert any(k.startswith("vision_tower.") for k in keys) and any(k.startswith("llm.") for k in keys)
    cfg = config(root, 2, "tiny2", "trainer.seed=7", f"model.mm_cfg.pretrain_mm_mlp_adapter={root}/tiny1/checkpoints",
                 pretrained=False)  # fmt: skip
    task = NevaTask(cfg, DistInfo())
    model = task.build_model()
    first = load_model(checkpoint_keys(root / "tiny1")[1])
    for part in ("vision_tower", "llm", "projector"):
        for (name, a), b in zip(getattr(model, part).state_dict().items(), getattr(first, part).state_dict().values()):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{part}.{name}")


def micro_batches(root, *sizes):
    cfg = config(root, 2, "unused", "model.mm_cfg.pretrain_mm_mlp_adapter=null", pretrained=False)
    task = NevaTask(cfg, DistInfo())
    torch.manual_seed(0)
    model = task.build_model()
    data = task._dataset("train")
    collate = task.build_train_loader(1).collate
    return task, model, [collate([data[i] for i in range(start, start + n)]) for start, n in
                         zip((0, 10), sizes)]  # fmt: skip


def test_the_loss_is_the_token_average_over_the_whole_step(root):
    task, model, (small, big) = micro_batches(root, 1, 3)
    sums, counts = [], []
    for b in (small, big):
        out = model(b["input_ids"], b["images"], b["attention_mask"], b["labels"])
        sums.append(out["loss"] * out["num_tokens"])
        counts.append(int(out["num_tokens"]))
    assert counts[0] != counts[1]
    task.start_step([small, big])
    # The trainer averages micro-batch losses; that average must be the token average of the whole step.
    step = (task.loss(model, small)[0] + task.loss(model, big)[0]) / 2
    torch.testing.assert_close(step, (sums[0] + sums[1]) / (counts[0] + counts[1]))
    assert task.batch_tokens(big) == counts[1]


def test_train_flops_match_a_trace_at_the_batch_length(root):
    from vlkit.tasks.neva import spliced_length
    from vlkit.utils.flops import tower_flops

    task, _, (batch,) = micro_batches(root, 3)
    length = spliced_length(batch["input_ids"], batch["attention_mask"], 16)
    assert length == batch["input_ids"].shape[1] + 15
    traced = tower_flops(create_model(task.model_config, device="meta"), length)
    want = 3 * (traced["image"].forward_backward + traced["llm"].forward_backward)
    assert task.train_flops(batch) == want


def test_a_short_run_learns(root):
    """End to end (projector + LLM train): the loss falls well below chance (ln 512 = 6.2) in a few seconds."""
    steps = ("trainer.max_steps=30", "trainer.micro_batch_size=8", "optim.lr=3e-3", "schedule.warmup_steps=5")
    cfg = config(root, 2, "short", "model.mm_cfg.pretrain_mm_mlp_adapter=null", *steps, pretrained=False)
    history = Trainer(cfg, task_for("neva")).fit()
    losses = [h["loss"] for h in history if "loss" in h]
    assert losses[0] > 5.5 and losses[-1] < 3.5


@pytest.mark.parametrize("sharded", [False, True])
def test_partial_checkpoints_in_both_formats(tmp_path, sharded):
    """The CheckpointManager side of stage 1: only the named entries are written, and only they are restored."""
    from vlkit.train.checkpoint import CheckpointError, CheckpointManager

    def model():
        return torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))

    torch.manual_seed(0)
    trained, fresh = model(), model()
    trained[0].requires_grad_(False)
    opt = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad])
    trained(torch.randn(4, 3)).sum().backward()
    opt.step()
    keys = {"1.weight", "1.bias"}
    manager = CheckpointManager(tmp_path)
    path = manager.save(1, trained, opt, state={"step": 1}, sharded=sharded, model_keys=keys)
    assert json.loads((path / "train_state.json").read_text())["partial_model"] is True
    if not sharded:
        with safetensors.safe_open(path / "model.safetensors", "pt") as f:
            assert set(f.keys()) == keys
    with pytest.raises(CheckpointError, match="part of the model only"):
        manager.load(None, fresh)
    before = fresh[0].weight.clone()
    fresh_opt = torch.optim.AdamW([p for p in fresh[1].parameters()])
    assert manager.load(None, fresh, fresh_opt, model_keys=keys) == {"step": 1}
    torch.testing.assert_close(fresh[1].weight, trained[1].weight, rtol=0, atol=0)
    torch.testing.assert_close(fresh[0].weight, before, rtol=0, atol=0)  # left as built
    assert len(fresh_opt.state) == 2
