"""Run under torchrun by test_grad_norm.py: the global gradient norm of a parallelised tiny CLIP equals the norm of
the same gradients in one process, and clipping by it gives the same clipped gradients.

Usage: python -m torch.distributed.run --nproc_per_node N grad_norm_worker.py MODE [MODE ...]
MODE: fsdp (FSDP2 on dp) | fsdp_tp (FSDP2 x TP via vlkit.parallel.parallelize) | tp_only (TP blocks, the rest plain)
Exits non-zero with a message on any mismatch.
"""

import math
import sys

import torch
import torch.distributed as dist

from vlkit.config import load_config
from vlkit.models import create_model
from vlkit.parallel import build_mesh, cleanup, clip_grad_norm_, init_distributed, parallelize
from vlkit.parallel.parallelize import apply_tensor_parallel
from vlkit.train.loss_scale import LossScaler

RTOL = 1e-5
BATCH = 4


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def fail(msg: str) -> None:
    raise SystemExit(f"rank {dist.get_rank()}: {msg}")


def close(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    got, want = full(got).detach().float(), want.detach().float()
    err = (got - want).abs().max().item() / max(want.abs().max().item(), 1e-12)
    if not err <= RTOL:
        fail(f"{name} differs, relative error {err:.3e}")


def per_sample_loss(out: dict) -> torch.Tensor:
    """Separable over samples (so dp slices add up to the full batch) and touching every tower and logit_scale."""
    return out["logit_scale"] * (out["image_features"] - out["text_features"]).pow(2).sum(-1)


def build(mode: str, info):
    tp = 1 if mode == "fsdp" else 2
    cfg = load_config("clip-tiny", [f"parallel.tensor_parallel_size={tp}", "parallel.data_parallel=fsdp",
                                    "model.text.vocab_size=1000", "model.text.eot_token_id=999",
                                    "model.vision.num_layers=1", "model.text.num_layers=1"])  # fmt: skip
    torch.manual_seed(0)
    ref = create_model(cfg)
    model = create_model(cfg)
    model.load_state_dict(ref.state_dict())
    mesh = build_mesh(info.device, tp)
    if mode == "tp_only":  # TP blocks on the tp mesh, embeddings / norms / heads stay plain replicated tensors
        apply_tensor_parallel(model, mesh["tp"])
    else:
        model, _ = parallelize(model, cfg, mesh, info.device)
    return ref, model, mesh


def check(mode: str, info) -> None:
    ref, model, mesh = build(mode, info)
    g = torch.Generator().manual_seed(1)
    pixels, ids = torch.randn(BATCH, 3, 32, 32, generator=g), torch.randint(1, 998, (BATCH, 77), generator=g)
    ids[torch.arange(BATCH), torch.tensor([5, 9, 12, 30])] = 999
    dp_rank, dp_size = mesh["dp"].get_local_rank(), mesh["dp"].size()
    if mode == "tp_only":
        dp_rank, dp_size = 0, 1  # no data parallel: both ranks see the whole batch
    n = BATCH // dp_size
    rows = slice(dp_rank * n, dp_rank * n + n)
    # FSDP averages gradients over dp ranks: scale the local sum so that the average is the full batch's mean.
    scaler = LossScaler(True, init_scale=1024.0)  # its unscale_ must work on DTensor shards as well
    loss = per_sample_loss(model(pixels[rows], ids[rows])).sum() * dp_size / BATCH
    scaler.scale(loss).backward()
    scaler.unscale_(model.parameters())
    (per_sample_loss(ref(pixels, ids)).sum() / BATCH).backward()
    ref_grads = {name: p.grad for name, p in ref.named_parameters() if p.grad is not None}
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    if grads.keys() != ref_grads.keys():
        fail(f"{mode}: gradients of {sorted(grads.keys() ^ ref_grads.keys())} differ in presence")
    if mode != "tp_only" and not any(hasattr(gr, "device_mesh") for gr in grads.values()):
        fail(f"{mode}: no DTensor gradient: the test would prove nothing")

    for p in (2.0, 1.0, math.inf):
        norm = clip_grad_norm_(model.parameters(), None, p)
        if type(norm) is not torch.Tensor or norm.dtype != torch.float32 or norm.ndim != 0:
            fail(f"{mode}: the norm is {type(norm).__name__} {norm.dtype} {tuple(norm.shape)}, not a 0-d fp32 tensor")
        every = [torch.zeros(()) for _ in range(dist.get_world_size())]
        dist.all_gather(every, norm)
        if any(not torch.equal(e, norm) for e in every):
            fail(f"{mode}: ranks disagree on the {p}-norm: {[e.item() for e in every]}")
        close(f"{mode}: {p}-norm", norm, torch.nn.utils.get_total_norm(list(ref_grads.values()), p))

    want = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)  # the norm is ~1: really clips
    if not want > 0.5:
        fail(f"{mode}: the reference norm {want.item()} would not be clipped")
    close(f"{mode}: norm returned by clipping", clip_grad_norm_(model.parameters(), 0.5), want)
    for name, p in model.named_parameters():
        if p.grad is not None:
            close(f"{mode}: clipped grad {name}", p.grad, ref.get_parameter(name).grad)

    # One rank's shard overflows: every rank sees an inf norm, and clipping leaves all gradients as they were.
    sharded = [p for p in model.parameters() if hasattr(p.grad, "device_mesh")]
    before = [p.grad._local_tensor.clone() for p in sharded]
    big = max(range(len(sharded)), key=lambda i: sharded[i].numel())  # not empty on any rank
    if dist.get_rank() == dist.get_world_size() - 1:
        sharded[big].grad._local_tensor.view(-1)[0] = float("inf")
        before[big].view(-1)[0] = float("inf")
    norm = clip_grad_norm_(model.parameters(), 0.5)
    if not math.isinf(norm.item()):
        fail(f"{mode}: one rank's inf gradient gave the norm {norm.item()}")
    if any(not torch.equal(p.grad._local_tensor, b) for p, b in zip(sharded, before)):
        fail(f"{mode}: clipping by an inf norm changed the gradients")
    # A NaN on one rank survives the max-reduction of the inf-norm (as a non-finite norm on every rank); gloo's max
    # drops a NaN held by the last rank.
    if dist.get_rank() == dist.get_world_size() - 1:
        sharded[big].grad._local_tensor.view(-1)[0] = float("nan")
    norm = clip_grad_norm_(model.parameters(), None, math.inf)
    if math.isfinite(norm.item()):
        fail(f"{mode}: one rank's NaN gradient gave the inf-norm {norm.item()}")


if __name__ == "__main__":
    info = init_distributed("cpu")
    for mode in sys.argv[1:]:
        check(mode, info)
    cleanup()
