"""Run under torchrun by test_parallel.py: a parallelised tiny model must match the same model in one process.

Usage: python -m torch.distributed.run --nproc_per_node N parallel_worker.py MODE   (MODE: ddp | fsdp | tp | fsdp_tp)
Exits non-zero with a message on any mismatch.
"""

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from vlkit.config import load_config
from vlkit.models import create_model
from vlkit.parallel import build_mesh, cleanup, init_distributed, parallelize

TOL = 1e-5


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def check(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    got, want = full(got).detach().float(), want.detach().float()
    err = (got - want).abs().max().item() / max(want.abs().max().item(), 1e-12)
    if not err <= TOL:
        raise SystemExit(f"rank {dist.get_rank()}: {name} differs, relative error {err:.3e}")


def train_steps(mode: str) -> None:
    """5 SGD steps of a ViT classifier: each rank sees half the global batch; weights must match one process.

    SGD rather than Adam: the key bias of attention has an exactly-zero true gradient, and Adam turns rounding noise
    in it into full-size steps, which no two summation orders agree on.
    """
    data_parallel = {"ddp": "ddp", "fsdp": "fsdp"}[mode]
    cfg = load_config("vit-tiny", [f"parallel.data_parallel={data_parallel}"])
    info = init_distributed("cpu")
    torch.manual_seed(0)
    ref = create_model(cfg)
    model = create_model(cfg)
    model.load_state_dict(ref.state_dict())
    mesh = build_mesh(info.device)
    model, _ = parallelize(model, cfg, mesh, info.device)
    opt, ref_opt = (torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (model, ref))
    g = torch.Generator().manual_seed(1)
    for step in range(5):
        x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
        lo, hi = info.rank * 4, info.rank * 4 + 4
        loss = F.cross_entropy(model(x[lo:hi]), y[lo:hi])
        loss.backward()
        opt.step()
        opt.zero_grad()
        ref_loss = F.cross_entropy(ref(x), y)
        ref_loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        check(f"loss at step {step}", mean_loss / info.world_size, ref_loss)
    inner = getattr(model, "module", model)
    for (name, p), (_, q) in zip(inner.named_parameters(), ref.named_parameters()):
        check(f"weight {name}", p, q)


def tensor_parallel(mode: str) -> None:
    """Forward and backward of a CLIP under TP (and FSDP x TP) equal the single-process ones."""
    tp = 2
    cfg = load_config("clip-tiny", [f"parallel.tensor_parallel_size={tp}", "model.text.vocab_size=1000",
                                    "model.text.eot_token_id=999", "model.vision.activation=quick_gelu"])  # fmt: skip
    info = init_distributed("cpu")
    torch.manual_seed(0)
    ref = create_model(cfg)
    model = create_model(cfg)
    model.load_state_dict(ref.state_dict())
    mesh = build_mesh(info.device, tp)
    model, plan = parallelize(model, cfg, mesh, info.device)
    assert plan.tensor_parallel == tp and plan.data_parallel == "fsdp", plan
    g = torch.Generator().manual_seed(1)
    pixels, ids = torch.randn(4, 3, 32, 32, generator=g), torch.randint(1, 998, (4, 77), generator=g)
    ids[:, 10] = 999
    dp_rank, dp_size = mesh["dp"].get_local_rank(), mesh["dp"].size()
    n = 4 // dp_size
    sl = slice(dp_rank * n, dp_rank * n + n)
    out = model(pixels[sl], ids[sl])
    want = ref(pixels, ids)
    for key in ("image_features", "text_features"):
        check(key, out[key], want[key][sl])
    # Loss on the local rows; FSDP averages gradients over dp ranks, so take the mean over rows as the reference.
    loss = (out["image_features"] @ out["text_features"].T).sum() * dp_size / 4
    loss.backward()
    ((want["image_features"][sl] @ want["text_features"][sl].T).sum() / 4 * dp_size).backward()
    # The reference gradient of the whole batch is the average of the per-dp-rank gradients.
    ref_grads = {}
    for name, p in ref.named_parameters():
        if p.grad is not None:
            grad = p.grad.clone()
            dist.all_reduce(grad)
            ref_grads[name] = grad / dist.get_world_size()
    for name, p in model.named_parameters():
        if name in ref_grads:
            check(f"grad {name}", p.grad, ref_grads[name])


if __name__ == "__main__":
    mode = sys.argv[1]
    (train_steps if mode in ("ddp", "fsdp") else tensor_parallel)(mode)
    cleanup()
