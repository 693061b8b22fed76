"""Train NeVA with LoRA through the real Trainer under a list of layouts (under torchrun, or alone for the one-process
reference) and write, per run, the per-step losses, the final adapters and the exported (merged) model's weights.

Usage: lora_worker.py DATA_ROOT OUT_DIR LAYOUT [LAYOUT ...]   (LAYOUT: single | fsdp | tp)
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
LAYOUTS = {
    "single": [f"trainer.micro_batch_size={GLOBAL}"],
    "fsdp": ["parallel.data_parallel=fsdp", f"trainer.micro_batch_size={GLOBAL // 2}"],
    "tp": ["parallel.tensor_parallel_size=2", f"trainer.micro_batch_size={GLOBAL}"],
}


def config(root: Path, out: Path, layout: str):
    return load_config("neva-tiny-finetune", [
        "trainer.max_steps=3",
        f"trainer.global_batch_size={GLOBAL}",
        "trainer.accelerator=cpu",
        "trainer.logging.tensorboard=false",
        "trainer.logging.log_every_n_steps=1",
        "data.num_workers=0",
        "data.val_path=null",
        "data.kind=llava",
        f"data.train_path={root}/instruct_train.json",
        f"model.llm.tokenizer={root}/tokenizer",
        "model.mm_cfg.pretrain_mm_mlp_adapter=null",
        "schedule.name=constant",
        "optim.name=sgd",  # see tests/train/layout_worker.py: Adam would turn rounding noise into lr-sized steps
        "optim.lr=0.05",
        "optim.momentum=0.9",
        "model.peft.lora.rank=4",
        "model.peft.lora.alpha=8",
        f"trainer.output_dir={out / layout}",
        *LAYOUTS[layout],
    ])  # fmt: skip


def train(root: Path, out: Path, layout: str) -> None:
    trainer = Trainer(config(root, out, layout), task_for("neva"))
    history = trainer.fit()
    inner = trainer._inner_model()
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(inner, options=options) if trainer.dist.distributed else inner.state_dict()
    if trainer.dist.is_main:
        run = out / layout
        save_file({k: v.detach().float().contiguous() for k, v in state.items()}, str(run / "final.safetensors"))
        (run / "losses.json").write_text(json.dumps([h["loss"] for h in history if "loss" in h]))
    del trainer, state, inner


if __name__ == "__main__":
    root, out = Path(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(1)
    for name in sys.argv[3:]:
        train(root, out, name)
    cleanup()
