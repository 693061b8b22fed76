"""Train clip-tiny for a few steps through the real Trainer (under torchrun, any layout) and write, from rank 0, the
full state dict gathered at the end as ``OUT/final.safetensors``: the reference the consolidated checkpoint and the
exported ``OUT/model`` must equal.

Usage: consolidate_worker.py OUT key=value ...
"""

import sys

import torch
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from vlkit.config import load_config
from vlkit.parallel import cleanup
from vlkit.tasks.clip import CLIPTask
from vlkit.train.trainer import Trainer

BASE = [
    "model.text.vocab_size=512",
    "model.text.eot_token_id=511",
    "trainer.logging.tensorboard=false",
    "trainer.accelerator=cpu",
    "trainer.micro_batch_size=2",
    "optim.lr=0.01",
    "data.num_workers=0",
]


class SameBatches:
    """The same seeded batch stream on every rank: what the test checks is the weights' round trip, not the data."""

    def __init__(self, micro: int, vocab: int):
        self.micro, self.vocab, self.index = micro, vocab, 0

    def __iter__(self):
        while True:
            g = torch.Generator().manual_seed(1000 + self.index)
            ids = torch.randint(1, self.vocab - 2, (self.micro, 77), generator=g)
            ids[:, 0], ids[:, 9] = self.vocab - 2, self.vocab - 1
            self.index += 1
            yield {"image": torch.randn(self.micro, 3, 32, 32, generator=g), "text": ids}

    def state_dict(self):
        return {"index": self.index}

    def load_state_dict(self, state):
        self.index = state["index"]


class SameBatchCLIPTask(CLIPTask):
    def build_train_loader(self, micro_batch_size: int):
        return SameBatches(micro_batch_size, self.cfg.model.text.vocab_size)


if __name__ == "__main__":
    out = sys.argv[1]
    cfg = load_config("clip-tiny", [*BASE, f"trainer.output_dir={out}", *sys.argv[2:]])
    trainer = Trainer(cfg, SameBatchCLIPTask)
    trainer.fit()
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(trainer._inner_model(), options=full)
    if trainer.dist.is_main:
        save_file({k: v.contiguous() for k, v in state.items()}, f"{out}/final.safetensors")
    del trainer, state  # release the meshes' process groups before tearing them down
    cleanup()
