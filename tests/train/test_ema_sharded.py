"""The weight EMA on FSDP2 parameters that a forward pass left gathered (``reshard_after_forward=False``, as
``parallel.fsdp_reshard_after_forward=false`` sets it): evaluating the average swaps shards for shards."""

WORKER = """
import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

from vlkit.parallel import cleanup, init_distributed
from vlkit.parallel.parallelize import fsdp_api
from vlkit.train.ema import ModelEma

info = init_distributed("cpu")
fully_shard, _ = fsdp_api()
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
mesh = init_device_mesh("cpu", (info.world_size,))
fully_shard(model[0], mesh=mesh, reshard_after_forward=False)
fully_shard(model, mesh=mesh, reshard_after_forward=False)
opt = torch.optim.SGD(model.parameters(), lr=0.5)
x = torch.ones(3, 4)
ema = ModelEma(model, 0.5)
for _ in range(2):
    model(x).sum().backward()
    opt.step()
    opt.zero_grad()
    ema.update(model)
with torch.no_grad():
    own = model(x)  # an evaluation: the weights stay gathered
    with ema.swapped_into(model):
        averaged = model(x)
    again = model(x)
assert not torch.equal(own, averaged) and torch.equal(own, again), (own, averaged, again)
print(f"rank {info.rank}: ema ok", flush=True)
cleanup()
"""


def test_the_ema_swaps_into_an_fsdp_model_whose_weights_a_forward_left_gathered(tmp_path, torchrun):
    script = tmp_path / "ema_worker.py"
    script.write_text(WORKER)
    result = torchrun(script, 2, timeout=180)
    assert "rank 0: ema ok" in result.stdout and "rank 1: ema ok" in result.stdout
