"""Tensor-parallel llama on 2 gloo ranks equals one process: padded logits and KV-cache greedy generation.

Usage: python -m torch.distributed.run --nproc_per_node 2 llama_tp_worker.py
"""

import torch

from vlkit.config import load_config
from vlkit.models import create_model
from vlkit.models.generate import generate, left_pad
from vlkit.parallel import build_mesh, cleanup, init_distributed, parallelize


def main() -> None:
    cfg = load_config("llama-tiny", ["parallel.tensor_parallel_size=2"])
    info = init_distributed("cpu")
    torch.manual_seed(0)
    ref = create_model(cfg).eval()
    model = create_model(cfg).eval()
    model.load_state_dict(ref.state_dict())
    model, plan = parallelize(model, cfg, build_mesh(info.device, 2), info.device)
    assert plan.tensor_parallel == 2, plan
    # Each rank holds one of the two key/value groups and its two query heads.
    qkv = model.llm.transformer.blocks[0].attn.qkv.weight
    assert qkv.to_local().shape[0] == qkv.shape[0] // 2
    ids, mask = left_pad([[1, 5, 9, 33, 17, 80, 3], [1, 44, 12]])
    with torch.no_grad():
        got, want = model(ids, attention_mask=mask), ref(ids, attention_mask=mask)
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-5, atol=1e-5)
    ours = generate(model, ids, attention_mask=mask, max_new_tokens=10, eos_token_ids=[])
    theirs = generate(ref, ids, attention_mask=mask, max_new_tokens=10, eos_token_ids=[])
    assert torch.equal(ours.tokens, theirs.tokens), (ours.tokens, theirs.tokens)


if __name__ == "__main__":
    main()
    cleanup()
