"""``vlkit info``: what a config resolves to and what it costs (parameters, FLOPs per sample)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from vlkit.config import load_config, to_dict
from vlkit.models import create_model
from vlkit.utils.flops import count_parameters, tower_flops
from vlkit.utils.memory import build_on_meta, estimate_model, estimate_training, machine_memory


def describe(name_or_path: str | Path, overrides: list[str] | None = None) -> dict:
    """Resolved config, parameter counts per tower and traced FLOPs per sample, as one JSON-ready dict."""
    cfg = load_config(name_or_path, overrides or [])
    notes: list[str] = []
    if cfg.model.arch == "neva":  # the architectures of the pretrained parts mm_cfg names (no weights read)
        from dataclasses import replace

        from vlkit.interop.neva import pretrained_architecture

        model_cfg, notes = pretrained_architecture(cfg.model)
        cfg = replace(cfg, model=model_cfg)
    # A size torch cannot describe even on the meta device is a TooLargeError naming its key, not a traceback.
    model = build_on_meta(lambda: create_model(cfg), cfg.model, prefix="model", where=cfg.name or str(name_or_path))
    params = {}
    if cfg.model.arch == "llama":
        towers = {"llm": model.llm}
    elif cfg.model.arch == "neva":
        towers = {"vision": model.vision_tower, "projector": model.projector, "llm": model.llm}
    else:
        towers = {"vision": getattr(model, "visual", None) or getattr(model, "backbone", None)}
    if hasattr(model, "text"):
        towers["text"] = model.text
    for name, module in towers.items():
        params[name] = count_parameters(module)
    if hasattr(model, "head"):
        params["head"] = count_parameters(model.head)
    params["total"] = count_parameters(model)
    if cfg.model.arch == "neva":  # what the config leaves trainable (frozen towers excluded)
        params["trainable"] = count_parameters(model, trainable_only=True)
    flops = {k: {"forward": v.forward, "train": v.forward_backward} for k, v in tower_flops(model).items()}
    flops["total"] = {kind: sum(f[kind] for f in flops.values()) for kind in ("forward", "train")}
    vision = cfg.model.vision
    if cfg.model.arch == "llama":
        seq = {"llm": cfg.model.llm.encoder_seq_length}
    elif cfg.model.arch == "neva":  # the image's positions in the LLM sequence, and the LLM context
        seq = {"vision": model.num_image_tokens, "llm": cfg.model.llm.encoder_seq_length}
    else:
        seq = {"vision": vision.class_token_length + vision.num_patches}
    if cfg.model.text is not None and cfg.model.arch == "clip":
        seq["text"] = cfg.model.text.encoder_seq_length
    report = {
        "name": cfg.name,
        "arch": cfg.model.arch,
        "parameters": params,
        "flops_per_sample": flops,
        "sequence_length": seq,
        "config": to_dict(cfg),
    }
    if cfg.model.arch == "neva":
        mm, llm = cfg.model.mm_cfg, cfg.model.llm
        report["projector"] = f"{mm.mm_mlp_adapter_type} {cfg.model.vision.hidden_size} -> {llm.hidden_size}"
    if notes:
        report["notes"] = notes
    report["memory"] = _memory(model, cfg)
    if "llm" in seq:  # a decoder's sample is a full-context sequence; its cost per token is what MFU uses
        report["flops_per_token"] = {kind: f / seq["llm"] for kind, f in flops["llm"].items()}
    return report


def _memory(model, cfg) -> dict:
    """The lower bounds ``vlkit.load_model`` and ``vlkit train`` hold against the machine (reported, not refused)."""
    weights = estimate_model(model, cfg.model)
    precision = str(cfg.trainer.precision).lower()
    precision = "bf16" if "bf16" in precision else "fp16" if "16" in precision else "fp32"
    training = estimate_training(model, cfg.model, precision=precision, optimizer=cfg.optim.name)
    available, machine = machine_memory(str(cfg.trainer.accelerator))
    return {
        "weights_bytes": weights.bytes,
        "training_bytes": training.bytes,
        "machine_bytes": available,
        "weights": weights.what,
        "training": training.what,
        "machine": machine,
        "fits": {"weights": weights.bytes <= available, "training": training.bytes <= available},
    }


def format_report(report: dict, show_config: bool = True) -> str:
    lines = []
    if show_config:
        lines += ["# resolved config", OmegaConf.to_yaml(report["config"]).rstrip(), ""]
    lines.append(f"# {report['name']} ({report['arch']})")
    lines.append(f"{'':<10}{'parameters':>16}{'':>4}{'GFLOPs/sample fwd':>20}{'fwd+bwd':>12}{'seq len':>10}")
    flops, seq = report["flops_per_sample"], report["sequence_length"]
    flop_key = {"vision": "image", "text": "text", "llm": "llm", "total": "total"}
    for tower, n in report["parameters"].items():
        f = flops.get(flop_key.get(tower, ""), {})
        fwd = f"{f['forward'] / 1e9:.2f}" if f else ""
        train = f"{f['train'] / 1e9:.2f}" if f else ""
        lines.append(f"{tower:<10}{n:>16,}{n / 1e6:>9.2f} M{fwd:>15}{train:>12}{seq.get(tower, ''):>10}")
    if "projector" in report:
        lines.append(f"projector: {report['projector']}")
    lines += [f"note: {note}" for note in report.get("notes", [])]
    if "memory" in report:
        mem = report["memory"]
        for kind in ("weights", "training"):
            note = "" if mem["fits"][kind] else " -- more than this machine holds"
            lines.append(f"memory: {mem[kind]}{note}")
        lines.append(f"memory: {mem['machine']} (activations come on top of both)")
    if "flops_per_token" in report:
        per = report["flops_per_token"]
        lines.append(f"per token: {per['forward'] / 1e9:.2f} GFLOPs forward, {per['train'] / 1e9:.2f} forward+backward")
    return "\n".join(lines)
