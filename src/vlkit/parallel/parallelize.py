"""Apply parallelism to a plain vlkit model from outside, in torchtitan's order: TP -> AC -> compile -> FSDP/DDP.

The model file never imports torch.distributed; everything here works on the modules' public structure
(towers with ``.config`` and ``.transformer.blocks``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from vlkit.config.schema import Config
from vlkit.nn.block import TransformerBlock
from vlkit.nn.mlp import SwiGLU
from vlkit.parallel.checkpointing import apply_activation_checkpointing, towers

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ParallelPlan:
    """What was applied, for logs and for the trainer (which must know how gradients are synchronised)."""

    data_parallel: str = "none"  # none | ddp | fsdp
    tensor_parallel: int = 1
    compiled: bool = False
    activation_checkpointing: list[str] = field(default_factory=list)
    autocast_dtype: torch.dtype | None = None  # O1: forward under torch.autocast with this dtype


def resolve_data_parallel(cfg: Config, world_size: int) -> str:
    """``auto``: FSDP when tensor parallel or O2 needs it, DDP for plain multi-process runs, none for one process."""
    mode = cfg.parallel.data_parallel
    tp = cfg.parallel.tensor_parallel_size
    if mode == "auto":
        if tp > 1 or cfg.trainer.amp_O2:
            return "fsdp"
        return "ddp" if world_size > 1 else "none"
    if mode == "ddp" and tp > 1:
        raise ValueError("parallel.data_parallel=ddp cannot be combined with tensor parallel; use fsdp (2-D)")
    if mode == "ddp" and cfg.trainer.amp_O2:
        raise ValueError("trainer.amp_O2 (megatron_amp_O2) needs parallel.data_parallel=fsdp")
    if mode in ("none",) and world_size > 1:
        raise ValueError(f"parallel.data_parallel=none with {world_size} processes: use ddp or fsdp")
    return mode


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Megatron-style 1-D tensor parallel in every block: QKV and MLP-in column-wise, out-projections row-wise.

    Embeddings, norms and heads stay replicated. Attention reads its local head count from the sharded QKV output
    (see vlkit.nn.attention), so no module attribute changes.
    """
    from torch.distributed.tensor.parallel import parallelize_module

    colwise, rowwise = _tp_styles()
    tp = tp_mesh.size()
    for name, cfg, stack in towers(model):
        kv = getattr(cfg, "num_query_groups", None) or cfg.num_attention_heads
        if cfg.num_attention_heads % tp or kv % tp or cfg.ffn_size % tp:
            raise ValueError(f"tensor parallel size {tp} does not divide the heads/FFN of tower {name!r}")
        for block in stack.blocks:
            assert isinstance(block, TransformerBlock)
            plan = {"attn.qkv": colwise(), "attn.proj": rowwise()}
            if isinstance(block.mlp, SwiGLU):
                plan.update({"mlp.gate": colwise(), "mlp.up": colwise(), "mlp.down": rowwise()})
            else:
                plan.update({"mlp.fc1": colwise(), "mlp.fc2": rowwise()})
            parallelize_module(block, tp_mesh, plan)


def _tp_styles():
    """Column- and row-wise parallel styles that also shard LoRA adapters (vlkit.nn.lora: ``lora_A`` [r, in],
    ``lora_B`` [out, r] beside the base Linear, same module names). Column-wise: B is split on the output like the
    weight, A replicated, so ``x A^T B^T`` comes out split like ``x W^T``. Row-wise: A is split on the input like the
    weight, B replicated, so ``x A^T`` is a partial sum reduced with the base output's. DTensor does the rest."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    def distribute(module: nn.Module, mesh: DeviceMesh, placements: dict[str, list], src_data_rank) -> None:
        for name, param in list(module.named_parameters(recurse=False)):
            dist_param = distribute_tensor(param, mesh, placements[name], src_data_rank=src_data_rank)
            module.register_parameter(name, nn.Parameter(dist_param, requires_grad=param.requires_grad))

    class Colwise(ColwiseParallel):
        def _partition_linear_fn(self, name, module, device_mesh):
            shard = [Shard(0)]
            placements = {"weight": shard, "bias": shard, "lora_A": [Replicate()], "lora_B": shard}
            distribute(module, device_mesh, placements, self.src_data_rank)

    class Rowwise(RowwiseParallel):
        def _partition_linear_fn(self, name, module, device_mesh):
            placements = {"weight": [Shard(1)], "bias": [Replicate()], "lora_A": [Shard(1)], "lora_B": [Replicate()]}
            distribute(module, device_mesh, placements, self.src_data_rank)

    return Colwise, Rowwise


def apply_compile(model: nn.Module) -> None:
    """Compile each transformer block in place (``Module.compile`` keeps state-dict keys free of ``_orig_mod``)."""
    for _, _, stack in towers(model):
        for block in stack.blocks:
            block.compile()


def fsdp_api():
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # torch 2.6 keeps FSDP2 under _composable
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
    return fully_shard, MixedPrecisionPolicy


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, param_dtype: torch.dtype | None, reshard: bool) -> None:
    """FSDP2: shard every block, then the rest of the model. O2 = bf16 parameters in compute, fp32 master weights
    and fp32 gradient reduction."""
    fully_shard, MixedPrecisionPolicy = fsdp_api()
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
    kwargs = {"mesh": dp_mesh, "reshard_after_forward": reshard}
    if mp is not None:
        kwargs["mp_policy"] = mp
    for _, _, stack in towers(model):
        for block in stack.blocks:
            fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)


def reshard_fsdp(model: nn.Module) -> None:
    """Every FSDP2 module's parameters back to their shards. A forward pass without ``reshard_after_forward`` (and
    any forward on torch < 2.8 for the root module) leaves the full weights registered as the parameters until the
    next backward; code that reads or writes parameters outside a training step (the weight EMA) needs the shards."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch 2.6 keeps FSDP2 under _composable
        from torch.distributed._composable.fsdp import FSDPModule
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def parallelize(
    model: nn.Module, cfg: Config, mesh: DeviceMesh | None, device: torch.device
) -> tuple[nn.Module, ParallelPlan]:
    """Move ``model`` to ``device`` and apply the config's parallelism; returns the wrapped model and the plan."""
    world = mesh.size() if mesh is not None else 1
    plan = ParallelPlan(data_parallel=resolve_data_parallel(cfg, world))
    tp = cfg.parallel.tensor_parallel_size
    if (tp > 1 or plan.data_parallel == "fsdp") and mesh is None:
        raise ValueError("tensor parallel and FSDP need an initialised process group (vlkit.parallel.init_distributed)")
    model.to(device)
    if tp > 1:
        apply_tensor_parallel(model, mesh["tp"])
        plan.tensor_parallel = tp
    plan.activation_checkpointing = apply_activation_checkpointing(model)
    if cfg.parallel.compile:
        apply_compile(model)
        plan.compiled = True
    precision = DTYPES[cfg.trainer.precision]
    o2 = cfg.trainer.amp_O2 and precision != torch.float32
    if not o2 and precision != torch.float32:
        plan.autocast_dtype = precision
    if plan.data_parallel == "fsdp":
        apply_fsdp(model, mesh["dp"], precision if o2 else None, cfg.parallel.fsdp_reshard_after_forward)
    elif plan.data_parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=ids)
    return model, plan
