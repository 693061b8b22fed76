"""What ``vlkit serve --model PATH`` serves: a NeVA (chat), a CLIP model (embeddings, zero-shot classification,
search over ``--index``) or a ViT classifier (top-k classes), recognised from the model's config.

A NeVA is read by :func:`vlkit.eval.vqa.load_assistant` (what ``vlkit chat`` talks to), which loads the weights
itself; the architecture is therefore peeked at from the config first, so that a large model is loaded once.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlkit.utils.errors import UserError

NEVA, CLIP, CLASSIFIER = "neva", "clip", "classifier"


class ClassifierModel:
    """A ViT classifier with its class names (``classes.json`` of the run, else ``class i``)."""

    def __init__(self, model: Any, model_path: str | os.PathLike):
        from vlkit.data.transforms import get_transform
        from vlkit.predict import find_class_names
        from vlkit.utils.modules import model_device

        self.model = model.eval()
        self.num_classes = int(model.config.num_classes)
        self.classes = find_class_names(model_path, self.num_classes) or [f"class {i}" for i in range(self.num_classes)]
        self.transform = get_transform(model, train=False)
        self.device = model_device(model)

    def probabilities(self, images: list[Any]) -> Any:
        """[N, num_classes] softmax probabilities (float32, CPU) of RGB PIL images, as ``vlkit predict`` computes."""
        import torch

        pixels = torch.stack([self.transform(img) for img in images]).to(self.device)
        with torch.no_grad():
            return self.model(pixels).float().softmax(dim=-1).cpu()


@dataclass
class ServedModel:
    """The model behind the API and what the endpoints need of it; exactly one of engine / encoder / classifier."""

    kind: str
    id: str
    path: str
    engine: Any = None  # vlkit.serve.generation.GenerationEngine (neva)
    encoder: Any = None  # vlkit.serve.encoder.ClipEncoder (clip)
    classifier: ClassifierModel | None = None
    index: Any = None  # vlkit.serve.index.EmbeddingIndex (clip, --index)
    aspect: str | None = None  # neva: how images meet the tower (pad: onto a square canvas first)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def classes(self) -> list[str] | None:
        return self.classifier.classes if self.classifier is not None else None

    def names(self) -> set[str]:
        """The names a request's ``model`` field may use."""
        return {self.id}


def model_arch(path: str | os.PathLike) -> str | None:
    """``neva`` | ``clip`` | ``vit_classifier`` | ... from the config alone (no weights read), or None when the
    format does not say without loading (the caller then loads the model and looks)."""
    from vlkit.interop.checkpoint_files import read_train_state, run_model_config
    from vlkit.interop.native import CONFIG_FILE, detect_format, read_config

    try:
        kind, where = detect_format(path)
        if kind in ("llava", "hf_llama"):
            return "neva"
        if kind in ("hf", "open_clip"):
            return "clip"
        if kind == "vlkit":
            return read_config(where)["model"].get("arch", "clip")
        if kind == "checkpoint":
            config = read_config(where)["model"] if (Path(where) / CONFIG_FILE).is_file() else None
            config = config or run_model_config(read_train_state(where)) or {}
            return config.get("arch", "clip")
    except (UserError, ValueError, OSError, KeyError):
        return None  # load_model below reports what is wrong with the path
    return None


def load_served(
    path: str | os.PathLike,
    *,
    index: str | os.PathLike | None = None,
    device: str = "auto",
    precision: str = "auto",
    name: str | None = None,
    max_batch: int = 8,
) -> ServedModel:
    """Load what ``path`` holds for serving (a model, checkpoint or run directory; converted HF / open_clip / LLaVA).

    Raises:
        UserError: a missing path, a model of no servable kind, an index for a model that is not CLIP or of another
            width; the message names the path.
    """
    from vlkit.eval.runtime import resolve_device
    from vlkit.interop.native import load_model, resolve_model_path
    from vlkit.serve.encoder import ClipEncoder, is_clip, model_id_for

    if not os.path.exists(path):
        raise UserError(f"--model {path}: no such file or directory")
    model_id = name or model_id_for(path)
    resolved = str(Path(path).expanduser().resolve())
    if model_arch(resolve_model_path(os.fspath(path))) == "neva":
        from vlkit.eval.vqa import load_assistant
        from vlkit.serve.generation import GenerationEngine

        if index is not None:
            raise UserError(f"--index {index}: an index serves a CLIP model; --model {path} is a NeVA")
        assistant, chosen = load_assistant(path, device=device, precision=precision)
        engine = GenerationEngine(assistant, max_batch=max_batch, model_id=model_id)
        return ServedModel(NEVA, model_id, resolved, engine=engine, aspect=chosen["aspect"])
    model = load_model(resolve_model_path(os.fspath(path)), device=resolve_device(device))
    if is_clip(model):
        encoder = ClipEncoder(model, model_id=model_id, model_path=resolved, precision=precision)
        return ServedModel(CLIP, model_id, resolved, encoder=encoder, index=_open_index(index, encoder, path))
    if getattr(model.config, "arch", "") == "vit_classifier":
        if index is not None:
            raise UserError(f"--index {index}: an index serves a CLIP model; --model {path} is a ViT classifier")
        return ServedModel(CLASSIFIER, model_id, resolved, classifier=ClassifierModel(model, resolve_model_path(
            os.fspath(path))))  # fmt: skip
    arch = getattr(model.config, "arch", type(model).__name__)
    raise UserError(f"--model {path}: a {arch} model; vlkit serve serves NeVA, CLIP and ViT classifier models")


def _open_index(index: str | os.PathLike | None, encoder: Any, path: str | os.PathLike) -> Any:
    if index is None:
        return None
    from vlkit.serve.index import EmbeddingIndex

    opened = EmbeddingIndex.open(index)
    opened.metas()  # read (and its row count checked) now, not by the first search on the event loop
    if opened.dim != encoder.dim:
        raise UserError(f"--index {index}: its vectors have {opened.dim} dimensions, --model {path} embeds into "
                        f"{encoder.dim}; build the index with this model (vlkit embed)")  # fmt: skip
    if opened.model_id != encoder.model_id:
        import logging

        logging.getLogger("vlkit.serve").warning("--index %s was made with model %r, serving %r: search results are "
                                                 "only meaningful for the same model", index, opened.model_id,
                                                 encoder.model_id)  # fmt: skip
    return opened
