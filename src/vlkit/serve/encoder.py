"""A CLIP model as an embedding function: texts and PIL images in, L2-normalised float32 vectors out.

The vectors are exactly what ``model.encode_text`` / ``model.encode_image`` give on the model's own tokenizer and
eval transform, normalised, so an index built here, the HTTP embeddings endpoint and ``vlkit eval`` agree.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlkit.utils.errors import UserError

DEFAULT_BATCH_SIZE = 64


class NotAClipModel(UserError, ValueError):
    """The model path loads, but as something without both towers of a CLIP model."""


def is_clip(model: nn.Module) -> bool:
    return callable(getattr(model, "encode_text", None)) and callable(getattr(model, "encode_image", None))


def model_id_for(path: str | os.PathLike) -> str:
    """A stable, readable name for a model path: the directory the user named (a run directory's name, not the
    ``step_N`` checkpoint it resolves to, which changes as training goes on)."""
    resolved = Path(path).expanduser().resolve()
    return resolved.parent.name if resolved.name in ("model", "checkpoints") else resolved.name


class ClipEncoder:
    """Embeds texts and images with a CLIP model; see :meth:`load`.

    Attributes:
        model: the CLIP model (eval mode). model_id: its name for metadata. model_path: the path it was loaded from.
        dim: the embedding width. logit_scale: exp(the model's logit scale), to turn cosines into probabilities.
        device: where the forwards run. batch_size: items per forward.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        model_id: str,
        model_path: str = "",
        precision: str = "auto",
        batch_size: int = DEFAULT_BATCH_SIZE,
    ):
        from vlkit.data.tokenizer import get_tokenizer
        from vlkit.data.transforms import get_transform
        from vlkit.eval.runtime import autocast_dtype, logit_scale
        from vlkit.utils.modules import model_device

        if not is_clip(model):
            arch = getattr(getattr(model, "config", None), "arch", type(model).__name__)
            raise NotAClipModel(f"{model_path or model_id}: a {arch} model, not a CLIP model (needs encode_image and "
                                "encode_text)")  # fmt: skip
        self.model = model.eval()
        self.model_id = model_id
        self.model_path = model_path
        self.device = model_device(model)
        self.dtype = autocast_dtype(precision, self.device)
        self.batch_size = batch_size
        text_cfg = model.config.text
        self.tokenizer = get_tokenizer(text_cfg.tokenizer, text_cfg.encoder_seq_length)
        self.transform = get_transform(model, train=False)
        with torch.no_grad():  # the width from one forward: converted models name it differently in their configs
            self.logit_scale = logit_scale(model)
            self.dim = int(self._forward(self.model.encode_text, self.tokenizer([""])).shape[-1])

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        device: str = "auto",
        precision: str = "auto",
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> ClipEncoder:
        """Load a CLIP model from anything :func:`vlkit.load_model` reads: a vlkit model, checkpoint or run directory,
        or a converted Hugging Face / open_clip directory.

        Raises:
            UserError: the path does not exist, holds no model, or holds a model that is not CLIP (the message names
                the path and what it holds); an unknown device or precision.
        """
        from vlkit.eval.runtime import resolve_device
        from vlkit.interop.native import load_model, resolve_model_path

        if not os.path.exists(path):
            raise UserError(f"--model {path}: no such file or directory")
        model = load_model(resolve_model_path(os.fspath(path)), device=resolve_device(device))
        return cls(model, model_id=model_id_for(path), model_path=str(Path(path).expanduser().resolve()),
                   precision=precision, batch_size=batch_size)  # fmt: skip

    def _forward(self, encode: Any, inputs: torch.Tensor) -> torch.Tensor:
        from vlkit.eval.runtime import autocast

        with autocast(self.device, self.dtype):
            features = encode(inputs.to(self.device))
        return F.normalize(features.float(), dim=-1).cpu()

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """[N, D] float32, L2-normalised, on the CPU."""
        parts = [self._forward(self.model.encode_text, self.tokenizer(list(texts[i : i + self.batch_size])))
                 for i in range(0, len(texts), self.batch_size)]  # fmt: skip
        return torch.cat(parts) if parts else torch.empty(0, self.dim)

    @torch.no_grad()
    def embed_images(self, images: list[Any]) -> torch.Tensor:
        """[N, D] float32, L2-normalised, on the CPU, from PIL images of any mode (the model's eval transform)."""
        parts = []
        for i in range(0, len(images), self.batch_size):
            pixels = torch.stack([self.transform(img) for img in images[i : i + self.batch_size]])
            parts.append(self.embed_pixels(pixels))
        return torch.cat(parts) if parts else torch.empty(0, self.dim)

    @torch.no_grad()
    def embed_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, D] from a batch already through :attr:`transform` (lets a loader transform in parallel)."""
        return self._forward(self.model.encode_image, pixels)
