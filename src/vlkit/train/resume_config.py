"""Resuming with a changed config, decided before anything heavy is built.

:func:`plan_resume` finds the checkpoint ``trainer.checkpoint.resume`` names, reads only its ``train_state.json``
(the config the run was started with is stored there), and compares it with the new config key by key:

- hyper-parameters (:data:`HYPERPARAMETERS`: lr, weight decay, Adam's betas / eps, SGD's momentum, the schedule,
  ``trainer.max_steps``, clipping, logging, evaluation and checkpoint cadence, ...) take effect from the resume
  step: the optimizer's parameter groups get the new values and the schedule is rebuilt from the new config at the
  current step (:func:`apply_hyperparameters`);
- keys that never matter for the continuation (:data:`IGNORED`: where things are written and how this resume was
  asked for) are not compared;
- every other key (the architecture, the seed, data paths and kind, batch sizes, precision, the optimizer's name,
  the parallel layout, and any key added to the schema later: unlisted means unsafe) makes an exact continuation
  impossible, and so does another world size when the checkpoint holds per-rank data positions. The run stops
  (exit 2) naming every such key, unless ``trainer.checkpoint.weights_only=true``: a new run from the checkpoint's
  model weights, at step 0 with a fresh optimizer, schedule and data position.

Every changed key is printed (old -> new) by rank 0.
"""

from __future__ import annotations

import fnmatch
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlkit.config.load import ConfigError
from vlkit.config.schema import Config
from vlkit.interop.checkpoint_files import (
    CheckpointError,
    decode_state,
    find_checkpoint,
    latest_checkpoint,
    read_train_state,
)
from vlkit.train.optim import build_scheduler, param_groups
from vlkit.train.run_dir import checkpoint_dir, on_rank0

__all__ = ["HYPERPARAMETERS", "IGNORED", "ResumePlan", "apply_hyperparameters", "classify_changes", "plan_resume"]

log = logging.getLogger(__name__)

# Keys whose new value takes effect from the resume step (shell-style patterns over dotted keys).
HYPERPARAMETERS = (
    "optim.lr",
    "optim.weight_decay",
    "optim.betas",
    "optim.eps",
    "optim.momentum",
    "schedule.*",
    "trainer.max_steps",
    "trainer.max_epochs",
    "trainer.gradient_clip_val",
    "trainer.max_nonfinite_steps",
    "trainer.val_check_interval",
    "trainer.ema_decay",  # the average continues with the new decay; none saved: it starts at the next step
    "trainer.logging.*",
    "trainer.checkpoint.every_n_steps",
    "trainer.checkpoint.keep_last",
    "trainer.collective_timeout_s",
    "trainer.peak_tflops",
    "trainer.save_model",
    "data.val_path",  # evaluation only: the training data and its position are untouched
    "parallel.fsdp_reshard_after_forward",  # memory against communication; the same numbers
    "model.*.activations_checkpoint_*",  # recomputation with the same random state: the same numbers
)
# Hyper-parameters only while set on both sides: null <-> a value changes the optimizer's parameter groups.
HYPERPARAMETERS_WHEN_SET = ("optim.layer_decay",)
# Keys never compared: where the run writes, and how this resume was asked for. The world size is compared itself,
# so the launcher's declarations are not.
IGNORED = (
    "name",
    "data_dir",
    "trainer.output_dir",
    "trainer.overwrite",
    "trainer.checkpoint.dir",
    "trainer.checkpoint.resume",
    "trainer.checkpoint.weights_only",
    "trainer.devices",
    "trainer.num_nodes",
)
WORLD_SIZE = "world size"  # the pseudo-key naming a change of the number of processes


@dataclass
class ResumePlan:
    """What resuming will do: ``path`` and ``step`` of the checkpoint, and the changed keys as ``{key: (old, new)}``
    (``incompatible`` is non-empty only with ``weights_only``)."""

    path: Path
    step: int
    weights_only: bool = False
    hyperparameters: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    incompatible: dict[str, tuple[Any, Any]] = field(default_factory=dict)


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def _plain(tree: Any) -> Any:
    """JSON's view of a value (tuples are lists), as the checkpoint stored it."""
    return json.loads(json.dumps(tree))


_ABSENT = object()


def classify_changes(old: dict, new: Config) -> tuple[dict[str, tuple[Any, Any]], dict[str, tuple[Any, Any]]]:
    """The keys that differ between a stored config (``asdict`` of a :class:`Config`) and ``new``, split into
    (hyper-parameters, incompatible). A key the stored config lacks (it predates the key) counts as the default."""
    before, after = _flatten(_plain(old)), _flatten(_plain(asdict(new)))
    defaults = _flatten(_plain(asdict(Config())))
    hyper, incompatible = {}, {}
    for key in sorted(after.keys() | before.keys()):
        if _matches(key, IGNORED):
            continue
        if key not in after:
            continue  # a key this version no longer has: nothing here can act on it
        a = before.get(key, defaults.get(key, _ABSENT))
        b = after[key]
        if a == b:
            continue
        a = None if a is _ABSENT else a
        both_set = a is not None and b is not None
        if _matches(key, HYPERPARAMETERS) or (_matches(key, HYPERPARAMETERS_WHEN_SET) and both_set):
            hyper[key] = (a, b)
        else:
            incompatible[key] = (a, b)
    return hyper, incompatible


def _show(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def _changes(changes: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{k} {_show(a)} -> {_show(b)}" for k, (a, b) in changes.items())


def _find_checkpoint(cfg: Config) -> Path | None:
    """The checkpoint directory ``trainer.checkpoint.resume`` names; None for "latest" when there is none yet."""
    resume = str(cfg.trainer.checkpoint.resume)
    ckpt_dir = checkpoint_dir(cfg)
    if resume in ("latest", "auto"):
        return latest_checkpoint(ckpt_dir)
    path = Path(resume)
    if not path.exists() and (ckpt_dir / path).exists():
        path = ckpt_dir / path  # a name inside the run's checkpoint directory, as CheckpointManager.load takes it
    if not path.exists():
        raise ConfigError(f"trainer.checkpoint.resume={resume}: no such checkpoint directory")
    try:
        return find_checkpoint(path) or path  # a run directory or a checkpoints folder: its latest checkpoint
    except CheckpointError as e:
        raise ConfigError(f"trainer.checkpoint.resume={resume}: {e}") from None


def _plan(cfg: Config, world_size: int) -> ResumePlan | None:
    ccfg = cfg.trainer.checkpoint
    if not ccfg.resume:
        if ccfg.weights_only:
            raise ConfigError(
                "trainer.checkpoint.weights_only=true needs trainer.checkpoint.resume (the checkpoint to take the "
                "weights from)"
            )
        return None
    path = _find_checkpoint(cfg)
    if path is None:
        if ccfg.weights_only:
            where = checkpoint_dir(cfg)
            raise ConfigError(
                f"trainer.checkpoint.resume={ccfg.resume} with weights_only=true: no checkpoint in {where}"
            )
        return None
    try:
        info = read_train_state(path)
    except CheckpointError as e:
        raise ConfigError(f"trainer.checkpoint.resume={ccfg.resume}: {e}") from None
    state = info.get("state") or {}
    plan = ResumePlan(path=path, step=int(info.get("step", 0)), weights_only=ccfg.weights_only)
    if isinstance(state.get("config"), dict):
        plan.hyperparameters, plan.incompatible = classify_changes(decode_state(state["config"], {}), cfg)
    else:
        log.warning("%s holds no config: the new config cannot be compared with the run's", path)
    saved_world = info.get("world_size", 1)
    if isinstance(state.get("data"), list) and saved_world != world_size:
        plan.incompatible[WORLD_SIZE] = (saved_world, world_size)
    if plan.weights_only:
        changed = {**plan.incompatible, **plan.hyperparameters}
        print(f"new run from the weights of {path} (step {plan.step})"
              + (f"; changed from its config: {_changes(changed)}" if changed else ""), flush=True)  # fmt: skip
        return plan
    if plan.incompatible:
        raise ConfigError(
            f"cannot continue {path} (step {plan.step}) exactly with {_changes(plan.incompatible)}: resume with the "
            "checkpoint's values, or start a new run from its weights with trainer.checkpoint.weights_only=true"
        )
    if plan.hyperparameters:
        print(f"resuming {path} at step {plan.step} with changed hyper-parameters: "
              f"{_changes(plan.hyperparameters)}", flush=True)  # fmt: skip
    return plan


def plan_resume(cfg: Config, rank: int = 0, world_size: int = 1) -> ResumePlan | None:
    """Compare the config of the checkpoint ``trainer.checkpoint.resume`` names with ``cfg`` (reading JSON only).

    Collective: rank 0 reads and prints, every rank gets the same plan or raises the same error.

    Returns:
        The plan, or None when there is nothing to resume (no ``resume``, or ``latest`` before any checkpoint).

    Raises:
        ConfigError: the checkpoint does not exist or is not one; keys that make an exact continuation impossible
            changed (without ``weights_only``); ``weights_only`` without a checkpoint.
    """
    return on_rank0(lambda: _plan(cfg, world_size), rank, world_size)


def apply_hyperparameters(model: nn.Module, optimizer: torch.optim.Optimizer, cfg: Config, step: int):
    """After loading a checkpoint: give the optimizer's parameter groups the hyper-parameters of ``cfg`` and return
    the learning-rate scheduler of ``cfg``'s schedule standing at ``step``, as if the run had used them from the start.

    ``model`` is the model the optimizer was built on (:func:`vlkit.train.optim.build_optimizer`'s argument).
    """
    ocfg = cfg.optim
    fresh = param_groups(model, ocfg)
    if [[id(p) for p in g["params"]] for g in fresh] != [[id(p) for p in g["params"]] for g in optimizer.param_groups]:
        raise RuntimeError("the optimizer's parameter groups differ from those the config gives: cannot update them")
    for new, group in zip(fresh, optimizer.param_groups):
        group["lr"] = group["initial_lr"] = new.get("lr", ocfg.lr)  # the schedule's base lr
        group["weight_decay"] = new["weight_decay"]
        if "lr_scale" in new:
            group["lr_scale"] = new["lr_scale"]
        if "betas" in group and ocfg.name != "adafactor":  # Adafactor's beta2 / eps mean other things
            group["betas"] = tuple(ocfg.betas)
            group["eps"] = ocfg.eps
        if "momentum" in group:
            group["momentum"] = ocfg.momentum
    scheduler = build_scheduler(optimizer, cfg.schedule, cfg.schedule.max_steps or cfg.trainer.max_steps, ocfg.lr)
    # Where an uninterrupted run with this schedule would stand after `step` scheduler steps (LambdaLR's own rule:
    # base lr x factor(step)).
    lrs = [base * factor(step) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    state = scheduler.state_dict()
    state.update(last_epoch=step, _last_lr=lrs)
    scheduler.load_state_dict(state)
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    return scheduler
