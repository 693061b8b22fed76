"""Run a short training with the fixed-data CLIP task (under torchrun or alone) and save the final weights.

Usage: train_worker.py OUT_DIR key=value ...
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from fixed_task import FixedDataCLIPTask  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # noqa: E402

from vlkit.config import load_config  # noqa: E402
from vlkit.parallel import cleanup  # noqa: E402
from vlkit.train.trainer import Trainer  # noqa: E402

BASE = [
    "model.text.vocab_size=512",
    "model.text.eot_token_id=511",
    "trainer.logging.tensorboard=false",
    "trainer.max_steps=5",
    "optim.name=sgd",
    "optim.lr=0.05",
    "optim.momentum=0.9",
    "schedule.name=constant",
    "data.num_workers=0",
]

if __name__ == "__main__":
    out = sys.argv[1]
    cfg = load_config("clip-tiny", [*BASE, f"trainer.output_dir={out}", *sys.argv[2:]])
    trainer = Trainer(cfg, FixedDataCLIPTask)
    trainer.fit()
    # Full (unsharded) weights from any parallel layout, written by rank 0 for the test to compare.
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = (
        get_model_state_dict(trainer._inner_model(), options=options)
        if trainer.dist.distributed
        else (trainer._inner_model().state_dict())
    )
    if trainer.dist.is_main:
        save_file({k: v.contiguous() for k, v in state.items()}, str(Path(out) / "final.safetensors"))
    del trainer, state  # release the FSDP meshes' process groups before tearing them down
    cleanup()
