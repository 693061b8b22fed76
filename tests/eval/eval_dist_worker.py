"""Run under torchrun (2 gloo ranks): sharded evaluation must equal one process evaluating everything.

argv: model_dir data_dir out.json. Rank 0 writes {"sharded": ..., "single": ..., "fsdp": ...} metrics.
"""

import json
import sys

import torch
import torch.distributed as dist

import vlkit
from vlkit.eval import evaluate_retrieval, evaluate_zeroshot
from vlkit.parallel import build_mesh, cleanup
from vlkit.parallel.parallelize import apply_fsdp


def run_all(model, **kw):
    # Batch size 4 over 21 and 20 images: rank 0 takes one batch more, so rank 1 runs the lockstep dummy forward.
    common = dict(num_workers=0, batch_size=4, progress=False, **kw)
    zs = evaluate_zeroshot(model, data_dir, **common)
    rt = evaluate_retrieval(model, data_dir, chunk_size=16, **common)
    return {"zeroshot": zs.metrics, "retrieval": rt.metrics, "n": [zs.num_samples, rt.num_samples],
            "ranks": rt.details["text_to_image_ranks"].tolist()}  # fmt: skip


model_dir, data_dir, out = sys.argv[1:4]
dist.init_process_group("gloo")
rank = dist.get_rank()
model = vlkit.load_model(model_dir)
result = {"sharded": run_all(model)}
if rank == 0:
    result["single"] = run_all(model, distributed=False)
dist.barrier()
# FSDP2: parameters are DTensors, so every rank must join every forward (encode_image / encode_text included).
apply_fsdp(model, build_mesh(torch.device("cpu"))["dp"], None, True)
result["fsdp"] = run_all(model)
if rank == 0:
    with open(out, "w") as f:
        json.dump(result, f)
del model  # release the FSDP mesh's process group before tearing it down
cleanup()
