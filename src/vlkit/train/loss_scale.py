"""Dynamic loss scaling for fp16 training, on plain, FSDP2 and tensor-parallel gradients alike.

fp16 gradients below ~6e-8 flush to zero, so the loss is multiplied by a large scale before backward and the
gradients divided by it before the optimizer. The scale halves on every overflowed step (which is skipped) and doubles
after ``growth_interval`` clean steps in a row — the policy of ``torch.amp.GradScaler``.

Why not wrap ``torch.amp.GradScaler`` itself: its overflow flag is per rank and per device, recorded inside
``unscale_`` and read back in ``step``/``update``. FSDP2 has no sharded form of it, and where torch reduces that flag
for DTensor gradients at all, it does so over the mesh of the first gradient of each device/dtype group only, so
whether tp and dp peers agree would depend on the order of the parameters; forcing agreement would mean rewriting
its private per-optimizer state. Here the overflow decision is the caller's: the trainer already all-reduces the
global gradient norm (``vlkit.parallel.clip_grad_norm_``) and the finiteness of the loss, and that norm is non-finite
exactly when some rank's gradient shard overflowed. So the decision is global at no extra collective, and the scale
is a host float (the trainer reads the decision on the host anyway), which a JSON checkpoint holds as is.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from vlkit.parallel.grad_norm import local_tensor


class LossScaler:
    """Dynamic loss scale; every method is a no-op (scale 1) when ``enabled`` is False (fp32 / bf16).

    Per step: ``scale(loss).backward()`` for each micro-batch, ``unscale_(parameters)`` once, then
    ``update(overflow)`` with the step's global overflow decision (the same on every rank).
    """

    def __init__(
        self,
        enabled: bool,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
    ) -> None:
        if not (growth_factor > 1.0 and 0.0 < backoff_factor < 1.0 and growth_interval > 0 and init_scale > 0):
            raise ValueError("loss scaling needs growth_factor > 1, 0 < backoff_factor < 1, growth_interval > 0")
        self.enabled = enabled
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval
        self._scale = float(init_scale)
        self._good_steps = 0  # clean steps since the last change of the scale

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        # fp32 before multiplying: an fp16 loss times 65536 would overflow on its own.
        return loss.float() * self._scale if self.enabled else loss

    @torch.no_grad()
    def unscale_(self, parameters: Iterable[torch.Tensor]) -> None:
        """Divide the gradients by the scale in place (each rank its own shards); inf/nan stay inf/nan."""
        if not self.enabled:
            return
        grads = [local_tensor(p.grad) for p in parameters if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, 1.0 / self._scale)  # exact: the scale is a power of two by default

    def update(self, overflow: bool) -> None:
        """Back off after an overflowed (skipped) step; grow after ``growth_interval`` clean steps in a row."""
        if not self.enabled:
            return
        if overflow:
            self._scale *= self.backoff_factor
            self._good_steps = 0
            return
        self._good_steps += 1
        if self._good_steps == self.growth_interval:
            self._scale *= self.growth_factor
            self._good_steps = 0

    def get_scale(self) -> float:
        return self._scale if self.enabled else 1.0

    def state_dict(self) -> dict:
        """JSON-friendly: a checkpoint's train_state.json holds it as is."""
        return {"scale": self._scale, "good_steps": self._good_steps} if self.enabled else {}

    def load_state_dict(self, state: dict) -> None:
        if self.enabled and state:
            self._scale = float(state["scale"])
            self._good_steps = int(state["good_steps"])
