"""Keys of the specification documents (NeMo's names) and where they live in vlkit's tree.

Two kinds of translation run on every raw YAML tree and every ``key=value`` override before it meets the schema:

* moved keys: the same meaning under a PyTorch-native name (``model.tensor_model_parallel_size`` becomes
  ``parallel.tensor_parallel_size``);
* flat tower keys: NeMo's ViT and NeVA configs put the tower's fields straight under ``model`` (``model.hidden_size``);
  here they belong to the tower the architecture is built around (``model.vision`` for a ViT classifier,
  ``model.llm`` for NeVA).

Value aliases (``trainer.precision=bf16-mixed``, ``optim.name=distributed_fused_adam``) are normalised after the
merge by :func:`normalize_values`. ``docs/config.md`` lists all of it.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from vlkit.config.schema import Config, TransformerConfig, VisionConfig

# Old dotted key -> new dotted key. A prefix match moves the whole subtree (model.optim.sched.name -> schedule.name).
MOVED_KEYS: dict[str, str] = {
    "model.tensor_model_parallel_size": "parallel.tensor_parallel_size",
    "model.megatron_amp_O2": "trainer.amp_O2",
    "model.micro_batch_size": "trainer.micro_batch_size",
    "model.global_batch_size": "trainer.global_batch_size",
    "model.optim.sched": "schedule",
    "model.optim": "optim",
    "optim.sched": "schedule",
    "trainer.log_every_n_steps": "trainer.logging.log_every_n_steps",
    # NeMo's NeVA configs keep the data block under the model (model.data.data_path: the LLaVA JSON).
    "model.data.data_path": "data.train_path",
    "model.data": "data",
    "data.data_path": "data.train_path",
}

# Keys accepted for compatibility whose only valid value is the one vlkit implements.
FIXED_KEYS: dict[str, Any] = {
    "model.pipeline_model_parallel_size": 1,
    "model.virtual_pipeline_model_parallel_size": None,
    "model.mcore_gpt": None,  # NeMo implementation switch; the architecture is the same either way
    # NeMo's placeholder count per image; vlkit derives it from the vision tower (image_token_count).
    "model.data.image_token_len": None,
    "data.image_token_len": None,
}

# Which tower receives NeMo's flat ``model.<field>`` keys, per architecture.
FLAT_TOWER = {"vit_classifier": "vision", "llama": "llm", "neva": "llm"}

_TOWER_FIELDS = (
    {f.name for f in fields(VisionConfig)}
    | {f.name for f in fields(TransformerConfig)}
    | {
        "position_embedding_type",
        "ffn_dropout",
        "num_query_groups",
        "rotary_base",
    }
)
_MODEL_FIELDS = {f.name for f in fields(Config().model.__class__)}

PRECISION_ALIASES = {
    "32": "fp32",
    "32-true": "fp32",
    "fp32": "fp32",
    "float32": "fp32",
    "16": "fp16",
    "16-mixed": "fp16",
    "fp16": "fp16",
    "float16": "fp16",
    "bf16": "bf16",
    "bf16-mixed": "bf16",
    "bfloat16": "bf16",
}
OPTIM_ALIASES = {"distributed_fused_adam": "adamw", "fused_adam": "adamw"}
SCHEDULE_ALIASES = {"cosineannealing": "cosine", "cosine": "cosine", "linear": "linear", "constant": "constant"}
ACTIVATION_ALIASES = {"fast-swiglu": "swiglu", "quick-gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu_tanh"}


def _move(path: str) -> str:
    for old in sorted(MOVED_KEYS, key=len, reverse=True):
        if path == old or path.startswith(old + "."):
            return MOVED_KEYS[old] + path[len(old) :]
    return path


def translate_path(path: str, arch: str) -> str | None:
    """Map one dotted key to its vlkit name; None means "accepted and dropped" (a FIXED_KEYS entry)."""
    if path in FIXED_KEYS:
        return None
    path = _move(path)
    parts = path.split(".")
    tower = FLAT_TOWER.get(arch)
    if (
        tower
        and len(parts) >= 2
        and parts[0] == "model"
        and parts[1] in _TOWER_FIELDS
        and parts[1] not in _MODEL_FIELDS
    ):
        return ".".join(["model", tower, *parts[1:]])
    return path


def check_fixed(path: str, value: Any) -> str | None:
    """An error message if a compatibility-only key asks for something vlkit does not do."""
    want = FIXED_KEYS.get(path)
    if path in FIXED_KEYS and want is not None and value not in (want, str(want)):
        return f"{path}={value} is not supported (vlkit has no pipeline parallelism; use FSDP and tensor parallel)"
    return None


def flatten(tree: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, leaf value) pairs of a nested dict; dict-valued leaves under free-form fields stay whole."""
    if not isinstance(tree, dict) or not tree:
        return [(prefix, tree)]
    out: list[tuple[str, Any]] = []
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.extend(flatten(v, key) if isinstance(v, dict) and v else [(key, v)])
    return out


def normalize_values(cfg: Config) -> list[str]:
    """Rewrite accepted value aliases in place; return notes describing each mapping that fired."""
    notes = []
    prec = str(cfg.trainer.precision).lower()
    if prec in PRECISION_ALIASES and PRECISION_ALIASES[prec] != cfg.trainer.precision:
        notes.append(f"trainer.precision={cfg.trainer.precision} -> {PRECISION_ALIASES[prec]}")
        cfg.trainer.precision = PRECISION_ALIASES[prec]
    name = cfg.optim.name.lower()
    if name == "distributed_fused_adam":
        notes.append("optim.name=distributed_fused_adam -> adamw with parallel.data_parallel=fsdp (sharded state)")
        cfg.parallel.data_parallel = "fsdp"
    if name in OPTIM_ALIASES:
        cfg.optim.name = OPTIM_ALIASES[name]
    if cfg.parallel.fsdp is not None:
        cfg.parallel.data_parallel = (
            "fsdp"
            if cfg.parallel.fsdp
            else ("ddp" if cfg.parallel.data_parallel == "fsdp" else cfg.parallel.data_parallel)
        )
    sched = cfg.schedule.name.lower()
    if sched in SCHEDULE_ALIASES:
        cfg.schedule.name = SCHEDULE_ALIASES[sched]
    for tower in (cfg.model.vision, cfg.model.text, cfg.model.llm):
        if tower is not None and tower.activation in ACTIVATION_ALIASES:
            tower.activation = ACTIVATION_ALIASES[tower.activation]
    return notes
