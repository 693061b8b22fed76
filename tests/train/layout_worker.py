"""Train every task under a list of parallel layouts through the real Trainer (under torchrun, or alone for the
one-process references) and write, per run, the per-step losses and the final full weights.

Usage: layout_worker.py DATA_ROOT OUT_DIR TASK:LAYOUT [TASK:LAYOUT ...]

Every run of a task trains the same global batch (GLOBAL samples per optimizer step) for STEPS steps from the same
initial weights; what differs is how the batch is spread over ranks and micro-batches, how the model is sharded and
what is recomputed. ``layouts(task)`` is the table; tests/train/test_layout_matrix.py compares each run with the
task's one-process run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from vlkit.config import load_config
from vlkit.parallel import cleanup
from vlkit.tasks import task_for
from vlkit.train.trainer import Trainer

GLOBAL = 8
STEPS = 3
COMMON = [
    "trainer.max_steps=3",
    f"trainer.global_batch_size={GLOBAL}",
    "trainer.accelerator=cpu",
    "trainer.logging.tensorboard=false",
    "trainer.logging.log_every_n_steps=1",
    "data.num_workers=0",
    "data.val_path=null",
    "schedule.name=constant",
    # SGD, not the presets' AdamW: Adam divides each gradient by its own magnitude, so a gradient that is zero in
    # exact arithmetic (the attention key bias) turns rounding noise of 1e-10 into a full lr-sized step of either sign.
    "optim.name=sgd",
    "optim.lr=0.05",
    "optim.momentum=0.9",
]

# Each task's data and tiny model. The CLIP stream reads one shard unshuffled (shuffle_buffer=1), so that however many
# readers share it (sample by sample), one step's global batch holds the same pairs; the ImageFolder and LLaVA loaders
# deal one seeded permutation to the data-parallel ranks.
TASKS = {
    "clip": (
        "clip-tiny",
        [
            "data.kind=webdataset",
            "data.train_path={root}/clip/train",
            "data.shuffle_buffer=1",
            "data.dataset_size=48",
            "data.clip_crop_scale=null",
            "model.vision.num_layers=2",
            "model.text.num_layers=2",
        ],
    ),  # fmt: skip
    "classify": (
        "vit-tiny-shapes",
        [
            "data.kind=imagefolder",
            "data.train_path={root}/classify/train",
            "data.mixup=0.8",
            "data.cutmix=1.0",
            "trainer.ema_decay=0.5",
            "model.vision.num_layers=2",
            "model.vision.hidden_size=32",
            "model.vision.ffn_hidden_size=64",
            "model.vision.num_attention_heads=2",
        ],
    ),  # fmt: skip
    # Stage 2 of the recipe (projector + LLM train, the vision tower frozen) with its gradient clipping; the towers
    # are built at random, so no stage-1 checkpoint is needed.
    "neva": (
        "neva-tiny-finetune",
        [
            "data.kind=llava",
            "data.train_path={root}/neva/instruct_train.json",
            "model.llm.tokenizer={root}/neva/tokenizer",
            "model.mm_cfg.pretrain_mm_mlp_adapter=null",
        ],
    ),  # fmt: skip
}

# Full recomputation of every block (one block per checkpointed range).
FULL_AC = ("activations_checkpoint_granularity=full", "activations_checkpoint_method=uniform",
           "activations_checkpoint_num_layers=1")  # fmt: skip
# The towers each task trains (activation checkpointing is set per tower).
AC_TOWERS = {"clip": ("vision", "text"), "classify": ("vision",), "neva": ("llm",)}


def layouts(task: str) -> dict[str, tuple[int, list[str]]]:
    """name -> (processes, overrides). ``single`` is the reference.

    Mixup mixes within a micro-batch, so the classify task keeps a micro-batch of 4 in every layout (the reference
    accumulates 2); the contrastive loss of CLIP is over the whole step's batch (gathered across ranks, or the
    gradient cache across micro-batches), and NeVA's token average is over the whole step."""
    half, quarter = GLOBAL // 2, GLOBAL // 4
    micro = {"single": GLOBAL, "dp": half, "tp": GLOBAL}
    if task == "classify":
        micro = {"single": half, "dp": half, "tp": half}
    ac = AC_TOWERS[task]
    table = {
        "single": (1, [f"trainer.micro_batch_size={micro['single']}"]),
        "ddp": (2, ["parallel.data_parallel=ddp", f"trainer.micro_batch_size={micro['dp']}"]),
        "fsdp": (2, ["parallel.data_parallel=fsdp", f"trainer.micro_batch_size={micro['dp']}"]),
        "tp": (2, ["parallel.tensor_parallel_size=2", f"trainer.micro_batch_size={micro['tp']}"]),
        "fsdp_tp": (4, ["parallel.tensor_parallel_size=2", f"trainer.micro_batch_size={micro['dp']}"]),
        "ac_full": (
            2,
            [
                "parallel.data_parallel=ddp",
                f"trainer.micro_batch_size={micro['dp']}",
                *(f"model.{t}.{k}" for t in ac for k in FULL_AC),
            ],
        ),  # fmt: skip
        "ac_selective": (
            2,
            [
                "parallel.data_parallel=fsdp",
                f"trainer.micro_batch_size={micro['dp']}",
                *(f"model.{t}.activations_checkpoint_granularity=selective" for t in ac),
            ],
        ),  # fmt: skip
        "o2": (
            2,
            [
                "parallel.data_parallel=fsdp",
                f"trainer.micro_batch_size={micro['dp']}",
                "trainer.precision=bf16",
                "trainer.amp_O2=true",
            ],
        ),  # fmt: skip
    }
    if task == "clip":  # plain accumulation of a contrastive loss is another loss: the gradient cache is exact
        table["accumulate"] = (2, ["parallel.data_parallel=ddp", f"trainer.micro_batch_size={quarter}",
                                   "trainer.gradient_cache=true"])  # fmt: skip
        table["gradient_cache"] = (1, [f"trainer.micro_batch_size={half}", "trainer.gradient_cache=true"])
    elif task == "neva":  # (the classify reference itself accumulates 2 micro-batches of 4)
        table["accumulate"] = (2, ["parallel.data_parallel=ddp", f"trainer.micro_batch_size={quarter}"])
    return table


def config(task: str, layout: str, root: Path, out: Path):
    preset, data = TASKS[task]
    _, overrides = layouts(task)[layout]
    return load_config(preset, [*COMMON, *(d.format(root=root) for d in data), *overrides,
                                f"trainer.output_dir={out / task / layout}"])  # fmt: skip


def train(task: str, layout: str, root: Path, out: Path) -> None:
    cfg = config(task, layout, root, out)
    trainer = Trainer(cfg, task_for(cfg.model.arch))
    run = out / task / layout
    if layout == "single":  # the starting point, to compare the direction of low-precision updates
        run.mkdir(parents=True, exist_ok=True)
        initial = {k: v.detach().float().contiguous() for k, v in trainer.model.state_dict().items()}
        save_file(initial, str(run / "initial.safetensors"))
    history = trainer.fit()
    # Full (unsharded) weights from any layout, written by rank 0.
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    inner = trainer._inner_model()
    state = get_model_state_dict(inner, options=options) if trainer.dist.distributed else inner.state_dict()
    if trainer.dist.is_main:
        save_file({k: v.detach().float().contiguous() for k, v in state.items()}, str(run / "final.safetensors"))
        losses = [h["loss"] for h in history if "loss" in h]
        (run / "losses.json").write_text(json.dumps(losses))
        last = [h for h in history if "loss" in h][-1]
        (run / "counters.json").write_text(json.dumps({k: last[k] for k in ("skipped_samples", "repaired_samples")}))
    del trainer, state, inner  # release the meshes' process groups before the next run and the teardown


if __name__ == "__main__":
    root, out = Path(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(1)
    for spec in sys.argv[3:]:
        task, layout = spec.split(":")
        train(task, layout, root, out)
    cleanup()
