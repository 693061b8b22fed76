"""One rank of the distributed loss checks; launched by ``test_ring.py`` under ``torch.distributed.run``.

Every rank builds the same global batch from a fixed seed, takes its shard, runs each loss across the
gloo group, and compares with a float64 single-process reference on the concatenated batch:

- the loss value;
- every rank's feature gradients (the convention: a rank's own features receive
  ``world_size * dL/dfeatures`` for the global-loss impls, exactly what open_clip's autograd all-gather
  delivers, so that DDP's averaging gives ``dL/dparams``);
- the logit-scale (and SigLIP bias) gradient after a DDP-style average over ranks;
- a real shared "tower" (linear map + normalisation) whose parameter gradients are averaged as DDP does.

The open_clip modes are also compared with a literal float64 transcription of open_clip's ClipLoss
for every rank. Prints one line per check and exits with status 1 on any mismatch.
"""

from __future__ import annotations

import os
import sys
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F
from loss_reference import contrastive_reference, grad_err, rel_err, siglip_reference, unit_features

from vlkit.losses import ContrastiveLoss, contrastive_loss, siglip_loss

TOL = 1e-5
# Degenerate features (all logits +-100) carry perfectly correlated float32 rounding of the logits
# (ulp(100) = 7.6e-6), which does not average out; for them only finiteness and this looser bound hold.
DEGENERATE_TOL = 1e-4


def features(sizes, dim, seed, kind="random"):
    return unit_features(sum(sizes), dim, seed, kind)


def shard(t, sizes, rank):
    start = sum(sizes[:rank])
    return t[start : start + sizes[rank]]


def reference(x, y, scale, labels=None):
    """Float64 global loss and gradients for the concatenated batch: (loss, dx, dy, dscale, scale mass)."""
    r = contrastive_reference(x, y, scale, labels)
    return r["loss"], r["d_image"], r["d_text"], r["d_scale"], r["scale_mass"]


def openclip_reference(x, y, scale, sizes, rank, world, local_loss, gather_with_grad):
    """open_clip's ClipLoss for one rank, simulated in one process in float64.

    Returns (rank's loss, gradient delivered to rank's image shard, to its text shard, to its scale),
    summing over every rank's loss where the gather carries gradients, as torch.distributed.nn does.
    """
    x = x.clone().requires_grad_()
    y = y.clone().requires_grad_()
    s = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    offs = [sum(sizes[:q]) for q in range(world)]
    total_for_grad = 0.0
    my_loss = None
    my_scale_grad = None
    for q in range(world):
        lo, hi = offs[q], offs[q] + sizes[q]
        if gather_with_grad:
            xa, ya = x, y
        else:
            keep = not local_loss
            xa = torch.cat(
                [x[lo:hi] if (keep and p == q) else x[offs[p] : offs[p] + sizes[p]].detach() for p in range(world)]
            )
            ya = torch.cat(
                [y[lo:hi] if (keep and p == q) else y[offs[p] : offs[p] + sizes[p]].detach() for p in range(world)]
            )
        sq = s if q == rank else s.detach()
        if local_loss:
            labels = torch.arange(sizes[q]) + lo
            lpi = sq * x[lo:hi] @ ya.T
            lpt = sq * y[lo:hi] @ xa.T
        else:
            labels = torch.arange(sum(sizes))
            lpi = sq * xa @ ya.T
            lpt = lpi.T
        lq = (F.cross_entropy(lpi, labels) + F.cross_entropy(lpt, labels)) / 2
        if q == rank:
            my_loss = lq.detach()
        total_for_grad = total_for_grad + lq
    total_for_grad.backward()
    my_scale_grad = s.grad
    lo, hi = offs[rank], offs[rank] + sizes[rank]
    return my_loss, x.grad[lo:hi], y.grad[lo:hi], my_scale_grad


def _slot(t, offs, sizes, p, live):
    part = t[offs[p] : offs[p] + sizes[p]]
    return part if p == live else part.detach()


def ddp_mean(t: torch.Tensor, group=None) -> torch.Tensor:
    t = t.detach().clone()
    dist.all_reduce(t, group=group)
    return t / dist.get_world_size(group)


def run_loss(fn, x, y, scale, dtype=torch.float32):
    xl = x.to(dtype).clone().requires_grad_()
    yl = y.to(dtype).clone().requires_grad_()
    s = torch.tensor(scale, dtype=torch.float32, requires_grad=True)
    loss = fn(xl, yl, s)
    loss.backward()
    return loss.detach(), xl.grad, yl.grad, s.grad


class Checker:
    def __init__(self, rank, world, group=None, failures=None):
        self.rank, self.world, self.group = rank, world, group
        self.failures = [] if failures is None else failures

    def close(self, name, value, ref, tol=TOL, mass=None, cancellation=100.0):
        err = rel_err(value, ref) if mass is None else grad_err(value, ref, mass, cancellation)
        ok = err <= tol and bool(torch.isfinite(value.detach()).all())
        print(f"[rank {dist.get_rank()}] {'ok  ' if ok else 'FAIL'} {name}: rel err {err:.2e}", flush=True)
        if not ok:
            self.failures.append(name)


def check_global(ck, name, fn, sizes, dim, scale, seed, labels=None, kind="random"):
    """An impl that returns the global loss: compare loss, grads (divided by W), and DDP-averaged scale grad."""
    rank, world = ck.rank, ck.world
    tol = TOL if kind == "random" else DEGENERATE_TOL
    x, y = features(sizes, dim, seed, kind)
    ref = reference(x, y, scale, labels)
    local_labels = None if labels is None else shard(labels, sizes, rank)
    loss, gx, gy, gs = run_loss(
        lambda a, b, s: fn(a, b, s, local_labels), shard(x, sizes, rank), shard(y, sizes, rank), scale
    )
    ck.close(f"{name} loss", loss, ref[0], tol)
    ck.close(f"{name} d_image", gx / world, shard(ref[1], sizes, rank), tol)
    ck.close(f"{name} d_text", gy / world, shard(ref[2], sizes, rank), tol)
    ck.close(f"{name} d_scale (rank)", gs, ref[3], tol, mass=ref[4])
    ck.close(f"{name} d_scale (DDP mean)", ddp_mean(gs, ck.group), ref[3], tol, mass=ref[4])


def check_openclip(ck, local_loss, gather_with_grad, sizes, dim, scale, seed):
    rank, world = ck.rank, ck.world
    name = f"naive local_loss={local_loss} gather_with_grad={gather_with_grad}"
    x, y = features(sizes, dim, seed)
    loss, gx, gy, gs = run_loss(
        lambda a, b, s: contrastive_loss(
            a, b, s, impl="naive", group=dist.group.WORLD, local_loss=local_loss, gather_with_grad=gather_with_grad
        ),
        shard(x, sizes, rank),
        shard(y, sizes, rank),
        scale,
    )
    oc = openclip_reference(x, y, scale, sizes, rank, world, local_loss, gather_with_grad)
    ck.close(f"{name} loss == open_clip", loss, oc[0])
    ck.close(f"{name} d_image == open_clip", gx, oc[1])
    ck.close(f"{name} d_text == open_clip", gy, oc[2])
    ref = reference(x, y, scale)
    ck.close(f"{name} d_scale == open_clip", gs, oc[3], mass=ref[4])
    ck.close(f"{name} mean loss over ranks == global", ddp_mean(loss), ref[0])
    if gather_with_grad:
        # Combined as open_clip does (DDP averages), the gradients are the global ones.
        ck.close(f"{name} d_image / W == global", gx / world, shard(ref[1], sizes, rank))
        ck.close(f"{name} d_text / W == global", gy / world, shard(ref[2], sizes, rank))
        ck.close(f"{name} d_scale DDP mean == global", ddp_mean(gs), ref[3], mass=ref[4])
    if not gather_with_grad and not local_loss:
        # Each rank's own features get the exact global gradient (no factor W): DDP's mean then scales towers by 1/W.
        ck.close(f"{name} d_image == global", gx, shard(ref[1], sizes, rank))


def check_tower(ck, impl, sizes, dim_in, dim, seed):
    """DDP with a shared linear tower: averaged parameter grads equal the single-process ones."""
    rank = ck.rank
    gen = torch.Generator().manual_seed(seed)
    inputs_img = torch.randn(sum(sizes), dim_in, generator=gen, dtype=torch.float64)
    inputs_txt = torch.randn(sum(sizes), dim_in, generator=gen, dtype=torch.float64)
    w_img0 = torch.randn(dim_in, dim, generator=gen, dtype=torch.float64) / dim_in**0.5
    w_txt0 = torch.randn(dim_in, dim, generator=gen, dtype=torch.float64) / dim_in**0.5
    t0 = torch.tensor(2.6592, dtype=torch.float64)

    def step(a_img, a_txt, dtype, loss_fn):
        w_img = w_img0.to(dtype).clone().requires_grad_()
        w_txt = w_txt0.to(dtype).clone().requires_grad_()
        t = t0.to(dtype).clone().requires_grad_()
        fi = F.normalize(a_img.to(dtype) @ w_img, dim=1)
        ft = F.normalize(a_txt.to(dtype) @ w_txt, dim=1)
        loss = loss_fn(fi, ft, t.exp())
        loss.backward()
        return loss.detach(), w_img.grad, w_txt.grad, t.grad

    def definition(fi, ft, scale):
        logits = scale * fi @ ft.T
        labels = torch.arange(fi.shape[0])
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

    ref = step(inputs_img, inputs_txt, torch.float64, definition)
    module = ContrastiveLoss(impl=impl)  # group "world", resolved at call time
    loss, g_img, g_txt, g_t = step(
        shard(inputs_img, sizes, rank), shard(inputs_txt, sizes, rank), torch.float32, module
    )
    ck.close(f"tower {impl} loss", loss, ref[0])
    ck.close(f"tower {impl} DDP-mean d_W_image", ddp_mean(g_img), ref[1])
    ck.close(f"tower {impl} DDP-mean d_W_text", ddp_mean(g_txt), ref[2])
    ck.close(f"tower {impl} DDP-mean d_log_scale", ddp_mean(g_t), ref[3])


def check_siglip(ck, impl, sizes, dim, scale, bias, seed):
    rank, world = ck.rank, ck.world
    x, y = features(sizes, dim, seed)
    ref = siglip_reference(x, y, scale, bias)
    xl = shard(x, sizes, rank).float().requires_grad_()
    yl = shard(y, sizes, rank).float().requires_grad_()
    s = torch.tensor(scale, requires_grad=True)
    b = torch.tensor(bias, requires_grad=True)
    loss = siglip_loss(xl, yl, s, b, impl=impl, group=dist.group.WORLD)
    loss.backward()
    name = f"siglip {impl} s={scale:g} b={bias:g}"
    ck.close(f"{name} loss", loss, ref["loss"])
    ck.close(f"{name} d_image / W", xl.grad / world, shard(ref["d_image"], sizes, rank))
    ck.close(f"{name} d_text / W", yl.grad / world, shard(ref["d_text"], sizes, rank))
    ck.close(f"{name} d_scale DDP mean", ddp_mean(s.grad), ref["d_scale"], mass=ref["scale_mass"])
    ck.close(f"{name} d_bias DDP mean", ddp_mean(b.grad), ref["d_bias"], mass=ref["bias_mass"])


def main() -> int:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(1234 + rank)
    ck = Checker(rank, world)
    group = dist.group.WORLD
    even = [16] * world
    uneven = [5 + 3 * r for r in range(world)]
    try:

        def ring(a, b, s, lab):
            return contrastive_loss(a, b, s, impl="ring", group=group, labels=lab)

        def ring_small_tiles(a, b, s, lab):
            from vlkit.losses import ring_contrastive_loss

            return ring_contrastive_loss(a, b, s, group, lab, tile_rows=3, tile_cols=7)

        def gathered(impl):
            return lambda a, b, s, lab: contrastive_loss(a, b, s, impl=impl, group=group, labels=lab)

        check_global(ck, "ring even s=14.3", ring, even, 64, 14.3, seed=1)
        check_global(ck, "ring even s=100", ring, even, 32, 100.0, seed=2)
        check_global(ck, "ring uneven tiles s=100", ring_small_tiles, uneven, 16, 100.0, seed=3)
        check_global(ck, "ring half-antipodal s=100", ring_small_tiles, even, 8, 100.0, seed=4, kind="half_antipodal")
        labels = torch.randint(0, sum(uneven), (sum(uneven),), generator=torch.Generator().manual_seed(5))
        check_global(ck, "ring uneven labels", ring_small_tiles, uneven, 16, 14.3, seed=5, labels=labels)
        check_global(ck, "ring auto", lambda a, b, s, lab: contrastive_loss(a, b, s, group=group), even, 16, 14.3, 6)
        check_global(ck, "naive gathered labels", gathered("naive"), uneven, 16, 14.3, seed=7, labels=labels)
        check_global(ck, "tiled gathered", gathered("tiled"), uneven, 16, 100.0, seed=8)
        for local_loss in (False, True):
            for gather_with_grad in (True, False):
                check_openclip(ck, local_loss, gather_with_grad, even, 16, 14.3, seed=9)
        check_tower(ck, "ring", even, 12, 8, seed=10)
        check_tower(ck, "naive", even, 12, 8, seed=11)
        check_siglip(ck, "ring", uneven, 16, 10.0, -10.0, seed=12)
        check_siglip(ck, "ring", even, 16, 100.0, 3.0, seed=13)
        check_siglip(ck, "naive", uneven, 16, 10.0, -10.0, seed=14)
        check_siglip(ck, "tiled", even, 16, 10.0, -10.0, seed=15)
        if world >= 4:
            # A sub-group of non-adjacent ranks: ring neighbours must be mapped to global ranks.
            members = [1, 3]
            sub = dist.new_group(members)
            if rank in members:
                ck_sub = Checker(dist.get_rank(sub), len(members), sub, ck.failures)

                def ring_sub(a, b, s, lab):
                    return contrastive_loss(a, b, s, impl="ring", group=sub, labels=lab)

                check_global(ck_sub, "ring sub-group [1, 3]", ring_sub, [6, 9], 16, 100.0, seed=16)
    except Exception:
        traceback.print_exc()
        ck.failures.append("exception")
    failed = torch.tensor(len(ck.failures))
    dist.all_reduce(failed)
    dist.destroy_process_group()
    if ck.failures:
        print(f"[rank {rank}] failures: {ck.failures}", file=sys.stderr, flush=True)
    return 1 if int(failed) else 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
