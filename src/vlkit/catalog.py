"""What vlkit can build and load: presets by family with parameter counts and purpose, and the public checkpoints
that ``vlkit convert`` turns into vlkit models (``vlkit list``, ``vlkit info --list``, ``vlkit.list_models``).

Parameter counts come from building each preset on the meta device (no weights allocated). That takes a few
tenths of a second per preset, so the table is cached per user, keyed by vlkit's version and the text of every
preset: a changed preset is recounted, an unwritable cache only costs the time.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from vlkit import __version__
from vlkit.config.load import PRESET_PACKAGE, list_presets

FAMILIES = (
    ("clip", "CLIP models"),
    ("vit", "ViT classifiers"),
    ("llama", "LLaMA decoders"),
    ("neva", "NeVA (LLaVA-style) models"),
    ("recipe", "Training recipes (real data; set data.train_path)"),
    ("cpu", "CPU recipes (built-in synthetic data, written on first use)"),
)
_ARCH_FAMILY = {"clip": "clip", "vit_classifier": "vit", "llama": "llama", "neva": "neva"}
_SYNTHETIC = ("synthetic_shapes", "synthetic_shapes_vqa")
_CACHE_FORMAT = 1  # bump when the cached rows change meaning


@dataclass(frozen=True)
class Checkpoint:
    """A public checkpoint vlkit converts (docs/interop.md); ``source`` is the local download of ``hub_id``."""

    name: str
    hub_id: str
    preset: str
    convert: str


CHECKPOINTS = (
    Checkpoint("OpenAI CLIP ViT-B/32", "openai/clip-vit-base-patch32", "clip-b32",
               "vlkit convert --from hf clip-vit-base-patch32 --out models/clip-b32"),
    Checkpoint("OpenAI CLIP ViT-L/14", "openai/clip-vit-large-patch14", "clip-l14",
               "vlkit convert --from hf clip-vit-large-patch14 --out models/clip-l14"),
    Checkpoint("OpenAI CLIP ViT-L/14 336px (LLaVA-1.5's encoder)", "openai/clip-vit-large-patch14-336", "clip-l14",
               "vlkit convert --from hf clip-vit-large-patch14-336 --out models/clip-l14-336"),
    Checkpoint("LAION CLIP ViT-H/14", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "clip-h14",
               "vlkit convert --from hf CLIP-ViT-H-14-laion2B-s32B-b79K --out models/clip-h14-laion"),
    Checkpoint("LLaVA-1.5 7B (Hugging Face layout)", "llava-hf/llava-1.5-7b-hf", "neva-llama2-7b-finetune",
               "vlkit convert --from llava llava-1.5-7b-hf --out models/llava-1.5-7b"),
)  # fmt: skip


def list_models(pattern: str | None = None) -> list[str]:
    """Preset names, sorted; ``pattern`` is a shell-style glob (``"clip-*"``) or, without wildcards, a substring."""
    names = list_presets()
    if not pattern:
        return names
    if not any(c in pattern for c in "*?["):
        pattern = f"*{pattern}*"
    return [n for n in names if fnmatch.fnmatchcase(n, pattern)]


def purpose(name: str) -> str:
    """The preset's one-line purpose: the first sentence of its leading comment, without the ``name:`` prefix."""
    text = (resources.files(PRESET_PACKAGE) / f"{name}.yaml").read_text()
    comment = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        comment.append(line.lstrip("#").strip())
    sentence = " ".join(comment)
    if sentence.startswith(f"{name}:"):
        sentence = sentence[len(name) + 1 :].strip()
    cut = sentence.find(". ")
    if cut > 0:
        sentence = sentence[:cut]
    sentence = sentence.rstrip(".")
    return sentence if len(sentence) <= 80 else sentence[:79].rstrip() + "…"


def _describe_preset(name: str) -> dict[str, Any]:
    from vlkit.config import load_config
    from vlkit.models import create_model
    from vlkit.utils.flops import count_parameters

    cfg = load_config(name, [])
    model = create_model(cfg.model, device="meta")
    has_recipe = bool({"data", "trainer"} & set(_top_level_keys(name)))
    if has_recipe:
        family = "cpu" if cfg.data.kind in _SYNTHETIC else "recipe"
    else:
        family = _ARCH_FAMILY.get(cfg.model.arch, cfg.model.arch)
    return {
        "name": name,
        "family": family,
        "arch": cfg.model.arch,
        "parameters": count_parameters(model),
        "trainable": count_parameters(model, trainable_only=True),
    }


def _top_level_keys(name: str) -> list[str]:
    text = (resources.files(PRESET_PACKAGE) / f"{name}.yaml").read_text()
    return [line.split(":", 1)[0] for line in text.splitlines() if line[:1].isalpha() and ":" in line]


def _cache_file() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    digest = hashlib.sha256(f"{__version__} {_CACHE_FORMAT}".encode())
    for name in list_presets():
        digest.update(name.encode() + b"\0" + (resources.files(PRESET_PACKAGE) / f"{name}.yaml").read_bytes())
    return Path(root) / "vlkit" / f"presets-{digest.hexdigest()[:16]}.json"


def describe_presets(names: list[str] | None = None) -> list[dict[str, Any]]:
    """One dict per preset (name, family, arch, parameters, trainable, purpose), from the cache when it is current."""
    names = list_presets() if names is None else names
    cache = _cache_file()
    try:
        known = {row["name"]: row for row in json.loads(cache.read_text())}
    except (OSError, ValueError, KeyError, TypeError):
        known = {}
    missing = [n for n in names if n not in known]
    if len(missing) > 3:  # seconds of silence otherwise
        print(f"counting the parameters of {len(missing)} presets on the meta device (cached in {cache.parent})...",
              file=sys.stderr, flush=True)  # fmt: skip
    rows = [known.get(n) or _describe_preset(n) for n in names]
    if any(n not in known for n in names):
        try:  # a read-only home only costs the counting time next run
            cache.parent.mkdir(parents=True, exist_ok=True)
            merged = {**known, **{r["name"]: r for r in rows}}
            cache.write_text(json.dumps(sorted(merged.values(), key=lambda r: r["name"])))
        except OSError:
            pass
    return [{**row, "purpose": purpose(row["name"])} for row in rows]  # read afresh: cheap, and never stale


def catalog(pattern: str | None = None) -> dict[str, Any]:
    """What ``vlkit list --json`` prints: the presets matching ``pattern`` and the public checkpoints."""
    names = list_models(pattern)
    checkpoints = [asdict(c) for c in CHECKPOINTS]
    if pattern:
        checkpoints = [c for c in checkpoints if c["preset"] in names]
    return {"presets": describe_presets(names), "checkpoints": checkpoints}


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def format_catalog(report: dict[str, Any]) -> str:
    lines = []
    for family, title in FAMILIES:
        rows = [r for r in report["presets"] if r["family"] == family]
        if not rows:
            continue
        lines += [f"{title}:", *(f"  {r['name']:<26}{_count(r['parameters']):>9}  {r['purpose']}" for r in rows), ""]
    if report["checkpoints"]:
        lines.append("Public checkpoints (download the Hugging Face directory once, then convert):")
        for c in report["checkpoints"]:
            lines += [f"  {c['name']} ({c['hub_id']}; preset {c['preset']})", f"    {c['convert']}"]
        lines.append("")
    if not report["presets"]:
        lines.append("no preset matches")
    else:
        lines.append("Details: vlkit info NAME. Train: vlkit train NAME [key=value ...].")
    return "\n".join(lines)


def create_model_and_transforms(name: str | os.PathLike, **overrides: Any) -> tuple[Any, Any, Any]:
    """``(model, train_transform, eval_transform)`` for a preset or YAML config, as open_clip users expect.

    The model is freshly initialised (``vlkit.load_model`` loads weights); ``overrides`` are relative to ``model``
    (``vision__num_layers=2``). The transforms are ``vlkit.get_transform(model, train=True / False)``.
    """
    from vlkit.data.transforms import get_transform
    from vlkit.models import create_model

    model = create_model(name, **overrides)
    return model, get_transform(model, train=True), get_transform(model, train=False)


def print_catalog(pattern: str | None, as_json: bool) -> int:
    report = catalog(pattern)
    print(json.dumps(report, indent=2) if as_json else format_catalog(report))
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "list",
        help="presets by family (parameters, purpose) and the public checkpoints with their convert line",
        description="List the presets by family (CLIP, ViT, LLaMA, NeVA, training recipes, CPU recipes) with their "
        "parameter counts (counted on the meta device; cached per user) and purpose, and the public checkpoints "
        "with the 'vlkit convert' line for each. Also 'vlkit info --list'.",
    )
    p.add_argument("pattern", nargs="?", help="only names matching this glob (clip-*) or containing this text")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=lambda args: print_catalog(args.pattern, args.json))
