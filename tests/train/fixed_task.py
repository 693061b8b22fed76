"""A CLIP task on fixed random batches: every step's global batch is a pure function of the step, and each rank
takes its contiguous slice, so runs with any number of ranks see the same global batches."""

import torch

from vlkit.tasks.clip import CLIPTask

GLOBAL_BATCH = 8


class FixedDataCLIPTask(CLIPTask):
    def build_train_loader(self, micro_batch_size: int):
        return FixedBatches(micro_batch_size, self.dist.rank, self.dist.world_size, self.cfg.model.text.vocab_size)


class FixedBatches:
    def __init__(self, micro: int, rank: int, world: int, vocab: int):
        self.micro, self.rank, self.world, self.vocab = micro, rank, world, vocab
        self.index = 0  # micro-batches consumed on this rank: the position to save and restore

    def __iter__(self):
        per_rank = GLOBAL_BATCH // self.world
        n_micro = per_rank // self.micro
        while True:
            step, j = divmod(self.index, n_micro)
            g = torch.Generator().manual_seed(1000 + step)  # the global batch of this step
            images = torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g)
            ids = torch.randint(1, self.vocab - 2, (GLOBAL_BATCH, 77), generator=g)
            ids[:, 0] = self.vocab - 2
            ids[torch.arange(GLOBAL_BATCH), torch.randint(3, 12, (GLOBAL_BATCH,), generator=g)] = self.vocab - 1
            start = self.rank * per_rank + j * self.micro
            self.index += 1
            yield {"image": images[start : start + self.micro], "text": ids[start : start + self.micro]}

    def state_dict(self):
        return {"index": self.index}

    def load_state_dict(self, state):
        self.index = state["index"]
