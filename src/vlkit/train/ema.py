"""Exponential moving average (EMA) of a model's trainable parameters.

After the n-th update (n = 0, 1, ...) every averaged tensor is ``ema = d_n·ema + (1-d_n)·param`` with
``d_n = min(decay, (1 + n) / (10 + n))``: the warm-up of TensorFlow's ``ExponentialMovingAverage(num_updates=...)``,
so that a short run's average is not dominated by the initial weights (with decay 0.9999 the first thousands of
steps would otherwise weigh the start almost alone).

Only parameters that require grad are averaged (frozen ones equal their average); buffers are not (a ViT has none
that training changes). Tensors are keyed by their clean names (DDP's ``module.``, torch.compile's ``_orig_mod.``
and checkpoint wrappers' prefixes removed), so a saved average loads into the same model wrapped differently.
Sharded parameters (FSDP2 / tensor parallel DTensors) are averaged shard by shard; :meth:`ModelEma.state_dict`
gathers them (a collective: call it on every rank) and :meth:`ModelEma.load_state_dict` shards them again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from vlkit.parallel.parallelize import reshard_fsdp
from vlkit.train.optim import strip_wrappers


def _inner(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DDP keeps the model under .module; FSDP2 / TP change it in place


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Clean name -> parameter, for the parameters that require grad (FSDP2's as shards, like the average's)."""
    reshard_fsdp(_inner(model))
    return {strip_wrappers(n): p for n, p in _inner(model).named_parameters() if p.requires_grad}


def _is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "full_tensor") and hasattr(t, "placements")


class ModelEma:
    """The average starts as a copy of ``model``'s trainable parameters; call :meth:`update` after each optimizer
    step, evaluate or export it with :meth:`swapped_into`.

    Args:
        model: the (possibly wrapped or sharded) model whose parameters are averaged.
        decay: the decay per update, in [0, 1).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        with torch.no_grad():
            self.shadow = {name: p.detach().clone() for name, p in trainable_parameters(model).items()}

    def current_decay(self) -> float:
        """The decay the next update uses."""
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        params = trainable_parameters(model)
        if params.keys() != self.shadow.keys():
            raise ValueError("the model's trainable parameters changed since the EMA was created")
        for name, avg in self.shadow.items():
            avg.lerp_(params[name].detach(), 1.0 - d)  # avg + (1-d)(p - avg) = d·avg + (1-d)·p
        self.updates += 1

    @contextlib.contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[nn.Module]:
        """Within the block ``model`` holds the averaged weights; its own are put back afterwards."""
        params = trainable_parameters(model)
        with torch.no_grad():
            saved = {name: p.detach().clone() for name, p in params.items()}
            for name, p in params.items():
                p.copy_(self.shadow[name])
        try:
            yield model
        finally:
            reshard_fsdp(_inner(model))  # a forward inside may have gathered the average: drop that copy first
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(saved[name])

    def state_dict(self, keep: bool = True) -> dict:
        """``{"decay", "updates", "params": {name: CPU tensor}}``; sharded tensors are gathered (collective).
        ``keep=False`` (the ranks whose copy is not written) joins the gathers but keeps no tensor: a whole model's
        average on every rank's host memory at each checkpoint would be one model copy per rank."""
        tensors = {}
        for name, t in self.shadow.items():
            full = t.full_tensor() if _is_dtensor(t) else t
            if keep:
                tensors[name] = full.detach().cpu()
        return {"decay": self.decay, "updates": self.updates, "params": tensors}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict` (of the same model, possibly wrapped or sharded differently).

        Raises:
            ValueError: names or shapes that do not match the model's trainable parameters.
        """
        saved = state["params"]
        if saved.keys() != self.shadow.keys():
            missing, extra = sorted(self.shadow.keys() - saved.keys()), sorted(saved.keys() - self.shadow.keys())
            raise ValueError(f"EMA state does not fit the model: missing {missing[:5]}, unexpected {extra[:5]}")
        for name, avg in self.shadow.items():
            value = saved[name]
            if tuple(value.shape) != tuple(avg.shape):
                raise ValueError(f"EMA state {name}: shape {tuple(value.shape)}, the model has {tuple(avg.shape)}")
            if _is_dtensor(avg):
                from torch.distributed.tensor import distribute_tensor

                value = distribute_tensor(value.to(avg.device_mesh.device_type), avg.device_mesh, avg.placements)
                avg.copy_(value)
            else:
                avg.copy_(value.to(avg.device, avg.dtype))
        self.updates = int(state["updates"])
