"""The one training loop. A task builds model and data and turns a batch into a loss; everything else is here:
parallelism, precision, accumulation, gradient cache, clipping, NaN handling, checkpoints, metrics."""

from __future__ import annotations

import contextlib
import copy
import logging
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from vlkit.config import ConfigError
from vlkit.config.schema import Config
from vlkit.parallel import ParallelPlan, build_mesh, data_parallel_of, init_distributed, parallelize
from vlkit.parallel.dist import DistInfo
from vlkit.parallel.grad_norm import clip_grad_norm_
from vlkit.tasks.base import Batch, Task, to_device
from vlkit.train.checkpoint import CheckpointError, CheckpointManager
from vlkit.train.ema import ModelEma
from vlkit.train.loss_scale import LossScaler
from vlkit.train.metrics import MetricSinks, Throughput, device_peak_flops, format_line
from vlkit.train.optim import build_optimizer, build_scheduler
from vlkit.train.resume_config import apply_hyperparameters, plan_resume
from vlkit.train.rng import capture_rng_state, restore_rng_state
from vlkit.train.run_dir import checkpoint_dir, claim_output_dir
from vlkit.utils.modules import unwrap

log = logging.getLogger("vlkit.train")

EMA_MODEL_DIR = "model_ema"  # <output_dir>/model_ema: the weight average (trainer.ema_decay), beside <output_dir>/model


class NonFiniteLossError(RuntimeError):
    pass


def accumulation_steps(cfg: Config, dp_size: int) -> int:
    """Micro-batches per optimizer step so that micro_batch_size x data-parallel ranks x steps = global batch."""
    micro, glob = cfg.trainer.micro_batch_size, cfg.trainer.global_batch_size
    if glob is None:
        return 1
    per_step = micro * dp_size
    if glob % per_step:
        raise ValueError(
            f"trainer.global_batch_size={glob} is not a multiple of trainer.micro_batch_size={micro} x "
            f"{dp_size} data-parallel ranks"
        )
    return glob // per_step


def _no_sync(model: nn.Module, plan: ParallelPlan, sync: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    if sync or plan.data_parallel == "none":
        return contextlib.nullcontext()
    if plan.data_parallel == "ddp":
        return model.no_sync()
    # FSDP2 keeps sharded gradients; skipping the reduce-scatter until the last micro-batch saves communication.
    model.set_requires_gradient_sync(False)
    return _restore_fsdp_sync(model)


@contextlib.contextmanager
def _restore_fsdp_sync(model: nn.Module):
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


class Trainer:
    """Runs ``task`` under ``cfg``: ``Trainer(cfg, task_cls).fit()``."""

    # True: rank 0 prints only warnings and errors (no banner, progress or summary); metrics still go to the files.
    quiet: bool = False

    def __init__(self, cfg: Config, task_cls: type[Task], dist_info: DistInfo | None = None) -> None:
        self.cfg = cfg
        tcfg = cfg.trainer
        needs_group = cfg.parallel.tensor_parallel_size > 1 or cfg.parallel.data_parallel == "fsdp" or tcfg.amp_O2
        self.dist = dist_info or init_distributed(tcfg.accelerator, tcfg.collective_timeout_s, force=needs_group)
        # Before anything heavy: does the checkpoint to resume fit this config, and is the output directory ours?
        self.resume_plan = plan_resume(cfg, self.dist.rank, self.dist.world_size)
        self.run_lock = claim_output_dir(cfg, self.dist.rank, self.dist.world_size)
        if self.resume_plan is not None:  # trainer.overwrite may have moved it aside, with the old run
            self.resume_plan.path = self.run_lock.relocate(self.resume_plan.path)
        self.device = self.dist.device
        torch.manual_seed(tcfg.seed)  # identical initial weights on every rank
        self.mesh = build_mesh(self.device, cfg.parallel.tensor_parallel_size)
        self.dp = data_parallel_of(self.mesh)  # what every loader shards the data by (tensor-parallel peers: alike)
        self.dp_size = self.dp.size
        self.task = task_cls(cfg, self.dist, self.dp)
        model = self.task.build_model()
        self.task.prepare_model(model)
        self.model, self.plan = parallelize(model, cfg, self.mesh, self.device)
        self.accum = accumulation_steps(cfg, self.dp_size)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_scheduler(
            self.optimizer, cfg.schedule, cfg.schedule.max_steps or tcfg.max_steps, cfg.optim.lr
        )
        self.out_dir = Path(tcfg.output_dir)
        self.ckpt = CheckpointManager(checkpoint_dir(cfg), tcfg.checkpoint.keep_last, self.dist.rank,
                                      self.dist.world_size)  # fmt: skip
        # The rank's RNG differs from here on (dropout, augmentation), so data parallel ranks do not draw alike.
        torch.manual_seed(tcfg.seed * 1000 + self.dist.rank + 1)
        self.loader = self.task.build_train_loader(tcfg.micro_batch_size)
        self.step = 0
        self.nonfinite_in_row = 0
        self.nonfinite_total = 0
        self.history: list[dict[str, Any]] = []
        self.scaler = LossScaler(tcfg.precision == "fp16")  # fp16 gradients underflow unscaled (O1 and O2 alike)
        self.ema: ModelEma | None = None  # the weight average (trainer.ema_decay), created at the first step
        self._ema_state: dict | None = None  # a resumed average, loaded once the first step has placed the parameters

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def _state(self) -> dict:
        state = {"step": self.step, "nonfinite_total": self.nonfinite_total, "config": asdict(self.cfg)}
        if hasattr(self.loader, "state_dict"):
            # Every rank reads its own part of the data: keep all positions (the checkpoint's JSON is rank 0's).
            positions = [self.loader.state_dict()]
            if dist.is_initialized() and self.dist.world_size > 1:
                positions = [None] * self.dist.world_size
                dist.all_gather_object(positions, self.loader.state_dict())
            state["data"] = positions
        task_state = self.task.state_dict()
        if task_state:
            state["task"] = task_state
        # Collective when sharded; the checkpoint writes rank 0's copy alone.
        ema_state = self.ema.state_dict(keep=self.dist.is_main) if self.ema is not None else self._ema_state
        if ema_state is not None:
            state["ema"] = ema_state
        if self.scaler.enabled:  # fp16's dynamic loss scale: a resumed run goes on with the scale it had
            state["loss_scale"] = self.scaler.state_dict()
        return state

    def save(self) -> Path:
        keys = self.task.checkpoint_keys(self._inner_model())
        return self.ckpt.save(self.step, self._inner_model(), self.optimizer, self.scheduler, state=self._state(),
                              model_keys=keys)  # fmt: skip

    def export_model(self) -> Path | None:
        """Write the whole trained model as a vlkit model directory, ``<output_dir>/model``, from any layout (a
        sharded model is gathered: collective), unless ``trainer.save_model`` is false. Checkpoints may be sharded or
        partial (NeVA stage 1); this directory is the model alone, usable by every ``--model`` and
        ``model.init_from``. Rank 0 writes and returns the path; other ranks return None."""
        if not self.cfg.trainer.save_model:
            return None
        from vlkit.interop.lora import save_merged_model
        from vlkit.interop.native import RUN_MODEL_DIR

        # LoRA adapters are merged into the base weights: the directory holds a plain model.
        path = save_merged_model(self._inner_model(), self.out_dir / RUN_MODEL_DIR, extra={"step": self.step})
        if path is not None:
            self.task.model_dir_files(path)
        return path  # fit()'s summary says where it is

    def export_ema(self) -> Path | None:
        """Write the weight average as a vlkit model directory, ``<output_dir>/model_ema`` (collective when sharded;
        rank 0 returns the path). Nothing without ``trainer.ema_decay``."""
        if self.ema is None:
            return None
        from vlkit.interop.lora import save_merged_model

        with self.ema.swapped_into(self.model):
            path = save_merged_model(self._inner_model(), self.out_dir / EMA_MODEL_DIR, extra={"step": self.step})
        if path is not None:
            self.task.model_dir_files(path)
        return path

    def resume(self, path: str | None = None) -> bool:
        """Load the checkpoint ``trainer.checkpoint.resume`` names (``path``: another one, "latest"/"auto" for the
        newest); False when there is nothing to resume from.

        Changed hyper-parameters take effect from the checkpoint's step (the schedule rebuilt at that step); with
        ``trainer.checkpoint.weights_only`` only the model weights are loaded and the run starts at step 0."""
        plan = self.resume_plan
        if path is not None and path != self.cfg.trainer.checkpoint.resume:
            cfg = copy.deepcopy(self.cfg)
            cfg.trainer.checkpoint.resume = path
            plan = plan_resume(cfg, self.dist.rank, self.dist.world_size)
        if plan is None:
            return False
        keys = self.task.checkpoint_keys(self._inner_model())
        if plan.weights_only:
            # A new run: its own random streams (the checkpoint's RNG states are restored by load), optimizer,
            # schedule and data position.
            rng = capture_rng_state()
            try:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=".*no RNG state for rank")
                    self.ckpt.load(plan.path, self._inner_model(), model_keys=keys)
            except CheckpointError as e:
                raise ConfigError(f"trainer.checkpoint.weights_only: {e}") from None
            restore_rng_state(rng)
            return True
        state = self.ckpt.load(plan.path, self._inner_model(), self.optimizer, self.scheduler, model_keys=keys)
        self.step = int(state["step"])
        self.nonfinite_total = int(state.get("nonfinite_total", 0))
        if "data" in state and hasattr(self.loader, "load_state_dict"):
            positions = state["data"]
            if len(positions) != self.dist.world_size:
                raise ConfigError(
                    f"{plan.path}: the checkpoint holds data positions for {len(positions)} ranks, this run has "
                    f"{self.dist.world_size}: resume with the same number of processes"
                )
            try:
                self.loader.load_state_dict(positions[self.dist.rank])
            except ValueError as e:  # another seed, dataset, batch size or loader version: the order would differ
                raise ConfigError(
                    f"{plan.path}: {e}; resume with the data settings it was saved with, or start "
                    "a new run from its weights (trainer.checkpoint.weights_only=true)"
                ) from None
        task_state = dict(state.get("task", {}))
        # The average is the trainer's own entry; checkpoints of earlier versions kept it in the classify task's state.
        ema_state = state.get("ema", task_state.pop("ema", None))
        if ema_state is not None and self.cfg.trainer.ema_decay is not None:
            self._ema_state = ema_state  # loaded at the first step, when the average is created
        if task_state:
            self.task.load_state_dict(task_state)
        if "loss_scale" in state:
            self.scaler.load_state_dict(state["loss_scale"])
        if plan.hyperparameters:
            self.scheduler = apply_hyperparameters(self.model, self.optimizer, self.cfg, self.step)
        return True

    def _inner_model(self) -> nn.Module:
        return unwrap(self.model)  # DDP wraps; FSDP2 / TP modify in place

    # -- one optimizer step ---------------------------------------------------------------------------------------
    def _autocast(self):
        if self.plan.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.plan.autocast_dtype)

    def _micro_batches(self, batches_iter) -> tuple[list[Batch], float, int | None, int | None]:
        """The step's micro-batches on the device, the time spent waiting for them, their FLOPs and tokens.

        FLOPs and tokens are counted from the host copies, before the transfer, so counting never syncs with the
        device."""
        t0 = time.perf_counter()
        host = [next(batches_iter) for _ in range(self.accum)]
        wait = time.perf_counter() - t0
        flops = [self.task.train_flops(b) for b in host]
        tokens = [self.task.batch_tokens(b) for b in host]
        return ([to_device(b, self.device) for b in host], wait, None if None in flops else sum(flops),
                None if None in tokens else sum(tokens))  # fmt: skip

    def _accumulate(self, batches: list[Batch]) -> tuple[torch.Tensor, dict[str, float]]:
        total, metrics = torch.zeros((), device=self.device), {}
        for i, batch in enumerate(batches):
            with _no_sync(self.model, self.plan, sync=i == len(batches) - 1), self._autocast():
                loss, metrics = self.task.loss(self.model, batch)
                self.scaler.scale(loss / len(batches)).backward()
            total += loss.detach() / len(batches)
        return total, metrics

    def _gradient_cache(self, batches: list[Batch]) -> tuple[torch.Tensor, dict[str, float]]:
        """Exact large-batch gradient with micro-batch memory: features without grad, one loss over all of them,
        then each micro-batch re-run (same RNG) and back-propagated from its slice of the feature gradients."""
        rng, cached = [], []
        with torch.no_grad(), self._autocast():
            for batch in batches:
                rng.append(_rng_state(self.device))
                cached.append(self.task.features(self.model, batch))
        keys = list(cached[0])
        feats = {}
        for k in keys:
            if cached[0][k].ndim == 0:  # replicated scalars (the logit scale): one leaf
                feats[k] = cached[0][k].detach().float().requires_grad_()
            else:
                feats[k] = torch.cat([c[k] for c in cached]).detach().float().requires_grad_()
        with self._autocast():
            loss, metrics = self.task.loss_from_features(feats)
        loss.backward()
        grads = {k: v.grad for k, v in feats.items()}
        offset = 0
        for i, batch in enumerate(batches):
            n = len(cached[i][keys[0]]) if cached[i][keys[0]].ndim else self.task.batch_size(batch)
            _set_rng_state(rng[i], self.device)
            with _no_sync(self.model, self.plan, sync=i == len(batches) - 1), self._autocast():
                out = self.task.features(self.model, batch)
                surrogate = sum(
                    (
                        out[k].float()
                        * (grads[k] / len(batches) if out[k].ndim == 0 else grads[k][offset : offset + n])
                    ).sum()
                    for k in keys
                    if grads[k] is not None
                )
                # The loss over the cached features ran in fp32; only this backward goes through the fp16 model.
                self.scaler.scale(surrogate).backward()
            offset += n
        return loss.detach(), metrics

    def _update_ema(self) -> None:
        decay = self.cfg.trainer.ema_decay
        if decay is None:
            return
        if self.ema is not None:
            self.ema.update(self.model)
            return
        # Created at the first step, when parameters have their final placement (device, FSDP / TP shards).
        self.ema = ModelEma(self.model, decay)
        if self._ema_state is not None:  # resumed: the saved average replaces the copy, and takes this step
            self.ema.load_state_dict(self._ema_state)
            self._ema_state = None
            self.ema.update(self.model)

    def _evaluate(self) -> dict[str, float]:
        """The task's held-out metrics of the model and, with ``trainer.ema_decay``, of its average (the task's
        ``evaluate`` again with the averaged weights swapped in: ``eval/<x>/...`` named ``eval/<x>_ema/...``; the
        result files under ``<output_dir>/eval`` are the model's)."""
        metrics = self.task.evaluate(self.model, self.step, self.out_dir)
        if self.ema is not None:
            with self.ema.swapped_into(self.model):
                averaged = self.task.evaluate(self.model, self.step, None)
            metrics.update({ema_metric_name(k): v for k, v in averaged.items()})
        return metrics

    def _clip_and_check(self, loss: torch.Tensor) -> tuple[bool, bool, float]:
        """Unscale, measure (and clip) the global gradient norm; decide on all ranks together whether the loss and
        the gradients are finite. Returns (loss finite, gradients finite, norm)."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        self.scaler.unscale_(params)
        # Always measured (the grad_norm metric): one foreach pass and one scalar all-reduce, on any mix of meshes.
        norm = clip_grad_norm_(params, self.cfg.trainer.gradient_clip_val)
        # The norm is the same on every rank; the loss may not be (a rank's own micro-batches).
        flags = torch.stack([torch.isfinite(loss.detach().float()).reshape(()), torch.isfinite(norm.to(loss.device))])
        flags = flags.float()
        if dist.is_initialized() and self.dist.world_size > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        loss_ok, grads_ok = (bool(f) for f in flags.tolist())
        return loss_ok, grads_ok, float(norm)

    def train_step(self, batches: list[Batch]) -> dict[str, float]:
        self.task.set_train_mode(self.model)
        self.task.start_step(batches)
        if self.cfg.trainer.gradient_cache and len(batches) > 1:  # one micro-batch: the cache would only cost
            loss, metrics = self._gradient_cache(batches)
        else:
            loss, metrics = self._accumulate(batches)
        loss_ok, grads_ok, grad_norm = self._clip_and_check(loss)
        if loss_ok and grads_ok:
            self.optimizer.step()
            self.task.after_optimizer_step(self._inner_model())
            self._update_ema()
            self.nonfinite_in_row = 0
        else:
            self.nonfinite_total += 1
            # An fp16 overflow (finite loss, overflowed gradients) is expected while the loss scale looks for its
            # level: skipped and counted, but not toward the abort as long as the scale is above 1. Overflowing at a
            # scale of 1 or less means the unscaled gradients overflow fp16: that, and a NaN loss, are real trouble.
            overflow = self.scaler.enabled and loss_ok and self.scaler.get_scale() > 1.0
            if overflow:
                log.info("step %d: fp16 gradients overflowed at loss scale %g, step skipped", self.step,
                         self.scaler.get_scale())  # fmt: skip
            else:
                self.nonfinite_in_row += 1
                log.warning(
                    "step %d: non-finite loss or gradient, step skipped (%d in a row)", self.step, self.nonfinite_in_row
                )
            if self.nonfinite_in_row >= self.cfg.trainer.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"{self.nonfinite_in_row} non-finite steps in a row (trainer.max_nonfinite_steps): lower the lr, "
                    "enable gradient clipping or check the data"
                )
        self.scaler.update(overflow=not grads_ok)  # the same decision on every rank, so the scales stay equal
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            # The schedule follows steps taken, skipped or not, so a resumed run stays aligned; torch warns when
            # the very first optimizer step was a skipped one.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.scheduler.step()
        loss_value = float(loss)
        if dist.is_initialized() and self.dist.world_size > 1:
            t = torch.tensor([loss_value], device=self.device)
            dist.all_reduce(t)
            loss_value = float(t) / self.dist.world_size
        out = {"loss": loss_value, "lr": self.scheduler.get_last_lr()[0], **metrics, "grad_norm": grad_norm}
        if self.scaler.enabled:
            out["loss_scale"] = self.scaler.get_scale()  # after this step's update: the next step's scale
        out["nonfinite_steps"] = self.nonfinite_total
        return out

    def _data_counters(self) -> dict[str, float]:
        """Skipped / repaired samples of the whole run so far, summed over the data-parallel ranks (tensor-parallel
        peers read the same samples: counted once): totals and one entry per reason. Collective."""
        mine = self.task.data_counters(self.loader)
        every = [mine]
        if self.dp.size > 1:
            every = [None] * self.dp.size
            dist.all_gather_object(every, mine, group=self.dp.group)
        out: dict[str, float] = {}
        for kind in ("skipped", "repaired"):
            total = 0
            for counts in every:
                for reason, n in counts.get(kind, {}).items():
                    out[f"{kind}/{reason}"] = out.get(f"{kind}/{reason}", 0) + n
                    total += n
            out[f"{kind}_samples"] = total
        return out

    # -- the loop -------------------------------------------------------------------------------------------------
    def _batches(self):
        """Batches forever, epoch after epoch (a loader iterates one epoch at a time). One empty pass is the rest of
        an epoch that a checkpoint saved right after its last batch; two in a row mean the data yields nothing."""
        empty_passes = 0
        while True:
            empty_passes += 1
            for batch in self.loader:
                empty_passes = 0
                yield batch
            if empty_passes == 2:
                raise RuntimeError("the training data yielded no batch: check data.train_path and the batch size")

    def _say(self, line: str) -> None:
        if self.dist.is_main and not self.quiet:
            print(line, flush=True)

    def _warn_schedule(self) -> None:
        horizon = self.cfg.schedule.max_steps or self.cfg.trainer.max_steps
        key = "schedule.max_steps" if self.cfg.schedule.max_steps else "trainer.max_steps"
        warmup = self.cfg.schedule.warmup_steps
        if self.dist.is_main and warmup and warmup >= horizon:
            print(
                f"vlkit train: warning: schedule.warmup_steps={warmup} >= {key}={horizon}: the learning rate "
                f"never leaves the warm-up (it peaks at step {horizon}, not {warmup})",
                file=sys.stderr,
                flush=True,
            )

    def _announce_start(self) -> None:
        """Rank 0: where the run writes, on what it runs, what it trains."""
        from vlkit.train.run_dir import CONFIG_FILE
        from vlkit.utils.flops import count_parameters

        tcfg, plan = self.cfg.trainer, self.plan
        model = self._inner_model()
        total, trainable = count_parameters(model), count_parameters(model, trainable_only=True)
        sinks = [n for n, on in (("metrics.jsonl", tcfg.logging.jsonl), ("tb/", tcfg.logging.tensorboard)) if on]
        layout = (
            f"data parallel {plan.data_parallel} x {self.dp_size}, tensor parallel {plan.tensor_parallel}, "
            f"precision {tcfg.precision}, activation checkpointing "
            f"{', '.join(plan.activation_checkpointing) or 'off'}, compiled {'yes' if plan.compiled else 'no'}"
        )
        self._say(
            f"run directory: {self.out_dir} ({CONFIG_FILE}; metrics: {', '.join(sinks) or 'off'}; "
            f"checkpoints: {self.ckpt.directory})"
        )
        self._say(f"devices: {self.dist.world_size} x {self.device.type} | layout: {layout}")
        self._say(
            f"parameters: {total:,} total, {trainable:,} trainable | steps {self.step} -> {tcfg.max_steps}, "
            f"global batch {tcfg.micro_batch_size * self.accum * self.dp_size} "
            f"({tcfg.micro_batch_size} per process x {self.accum} accumulation x {self.dp_size} ranks)"
        )

    def _announce_end(self, seconds: float, checkpoint: Path | None, model_path: Path | None) -> None:
        minutes, secs = divmod(int(round(seconds)), 60)
        self._say(f"finished {self.cfg.name}: step {self.step}/{self.cfg.trainer.max_steps} in {minutes}m {secs:02d}s")
        last = next((h for h in reversed(self.history) if "loss" in h), None)
        if last is not None:
            self._say("final metrics: " + format_line(last["step"], self.cfg.trainer.max_steps, last))
        evals = next((h for h in reversed(self.history) if "loss" not in h), None)  # the last evaluation's entry
        if evals is not None:
            self._say(f"final eval (step {evals['step']}): " + " | ".join(
                f"{k.split('/', 1)[-1]} {v:.4f}" for k, v in evals.items() if k != "step"))  # fmt: skip
        if checkpoint is not None:
            self._say(f"checkpoint: {checkpoint}")
        if model_path is not None:
            self._say(f"model: {model_path} (vlkit eval / predict / convert --model {model_path})")

    def fit(self) -> list[dict[str, Any]]:
        tcfg = self.cfg.trainer
        started = time.perf_counter()
        if tcfg.checkpoint.resume:
            resumed = self.resume()
            if not tcfg.checkpoint.weights_only:  # a new run: plan_resume said whence
                self._say(
                    f"resumed from step {self.step}" if resumed else "no checkpoint to resume from: starting fresh"
                )
            if resumed and self.step >= tcfg.max_steps and not tcfg.checkpoint.weights_only:
                return self._finished_already()
        self._warn_schedule()
        self._announce_start()
        meter = Throughput(device_peak_flops(self.device, tcfg.peak_tflops), self.dist.world_size)
        sinks = MetricSinks(self.out_dir, self.dist.is_main, tcfg.logging.jsonl, tcfg.logging.tensorboard)
        bar = _progress(self.dist.is_main and not self.quiet, tcfg.max_steps, self.step)
        every = max(1, tcfg.logging.log_every_n_steps)
        batches_iter = self._batches()
        try:
            while self.step < tcfg.max_steps:
                batches, wait, flops, tokens = self._micro_batches(batches_iter)
                metrics = self.train_step(batches)
                self.step += 1
                meter.update(sum(self.task.batch_size(b) for b in batches), wait, flops, tokens)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}")
                if self.step % every == 0 or self.step == tcfg.max_steps:
                    metrics.update(meter.summary())
                    if self.device.type == "cuda":
                        metrics["peak_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9
                    metrics.update(self._data_counters())
                    sinks.log(self.step, metrics)
                    self.history.append({"step": self.step, **metrics})
                    if self.dist.is_main and not self.quiet:
                        _write(bar, format_line(self.step, tcfg.max_steps, metrics))
                    meter.reset()
                interval = tcfg.val_check_interval
                if self.step == tcfg.max_steps or (interval and self.step % interval == 0):
                    evaluation = self._evaluate()
                    if evaluation:
                        sinks.log(self.step, evaluation)
                        self.history.append({"step": self.step, **evaluation})
                        if self.dist.is_main and not self.quiet:
                            _write(bar, f"step {self.step} eval | " + " | ".join(
                                f"{k.split('/', 1)[-1]} {v:.4f}" for k, v in evaluation.items()))  # fmt: skip
                every_ckpt = tcfg.checkpoint.every_n_steps
                if every_ckpt and self.step % every_ckpt == 0 and self.step < tcfg.max_steps:
                    self.save()
            checkpoint = self.save()
            model_path = self.export_model()
            self.export_ema()  # as the classify task always did: whatever trainer.save_model says
        finally:
            if bar is not None:
                bar.close()
            sinks.close()
            self.run_lock.release()
        self._announce_end(time.perf_counter() - started, checkpoint, model_path)
        return self.history

    def _finished_already(self) -> list[dict[str, Any]]:
        """``resume=latest`` on a run that reached ``trainer.max_steps``: nothing to train, nothing rewritten (the
        model is exported only if the run died between its last checkpoint and the export)."""
        from vlkit.interop.native import RUN_MODEL_DIR

        try:
            model_path = self.out_dir / RUN_MODEL_DIR
            if self.cfg.trainer.save_model and not (model_path / "config.json").is_file():
                self.export_model()  # collective: every rank takes this branch alike (the step is the checkpoint's)
            decay = self.cfg.trainer.ema_decay
            ema_path = self.out_dir / EMA_MODEL_DIR
            if decay is not None and self._ema_state is not None and not (ema_path / "config.json").is_file():
                self.ema = ModelEma(self.model, decay)  # the checkpoint's average, exported as the last step does
                self.ema.load_state_dict(self._ema_state)
                self._ema_state = None
                self.export_ema()
        finally:
            self.run_lock.release()
        self._say(
            f"{self.out_dir}: the run is finished (step {self.step} >= trainer.max_steps="
            f"{self.cfg.trainer.max_steps}); nothing to train. Raise trainer.max_steps to train on."
        )
        if self.cfg.trainer.save_model:
            self._say(f"model: {model_path}")
        return self.history


def ema_metric_name(key: str) -> str:
    """``eval/<x>/<metric>`` -> ``eval/<x>_ema/<metric>`` (another name gets an ``_ema`` suffix)."""
    parts = key.split("/", 2)
    if len(parts) == 3 and parts[0] == "eval":
        return f"eval/{parts[1]}_ema/{parts[2]}"
    return f"{key}_ema"


def _progress(enabled: bool, total: int, initial: int):
    # A bar redrawn with carriage returns is for a terminal; in a Slurm log or a redirected file it would be
    # thousands of partial lines, so there the periodic log lines (format_line) are the progress.
    if not enabled or not (sys.stdout.isatty() and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=True)


def _write(bar, line: str) -> None:
    if bar is not None:
        bar.write(line)
    else:
        print(line, flush=True)
