"""The request bodies of the HTTP API (pydantic models: FastAPI validates them and names a bad field), images given
as URLs, and OpenAI chat messages turned into the conversation turns a NeVA answers.

Images come inline, as ``data:image/...;base64,...`` URLs. The server never fetches an ``http(s)://`` URL (a server
that fetches what a client names can be made to reach into its own network); a local path or ``file://`` URL is read
only when the operator allowed it (``--allow-local-files``).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlparse

from pydantic import BaseModel, ConfigDict, Field

from vlkit.serve.errors import ApiError

MAX_STOP_STRINGS = 4  # as OpenAI
MAX_INPUTS = 2048  # items of one embeddings request, as OpenAI
MAX_LABELS = 1000  # zero-shot labels of one request (ImageNet's 1000; each costs 80 prompt forwards once)


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields vlkit has no use for (user, metadata)


class ImageUrl(_Body):
    url: str
    detail: str | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ImagePart(_Body):
    type: Literal["image_url"]
    image_url: ImageUrl


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class ChatRequest(_Body):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)  # 0: greedy, what `vlkit chat` answers
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)  # what torch's generators take
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None


class EmbeddingRequest(_Body):
    model: str | None = None
    input: str | Annotated[list[str | ImagePart], Field(max_length=MAX_INPUTS)] = Field(union_mode="left_to_right")
    encoding_format: Literal["float", "base64"] = "float"


class ClassifyRequest(_Body):
    model: str | None = None
    image: str
    top_k: int = Field(default=5, ge=1)
    labels: list[str] | None = Field(default=None, max_length=MAX_LABELS)


class SearchRequest(_Body):
    model: str | None = None
    query: str | None = None
    image: str | None = None
    top_k: int = Field(default=10, ge=1, le=1000)


# ---------------------------------------------------------------------------------------------------------- images


@dataclass(frozen=True)
class ImagePolicy:
    """What images the server accepts (from the command line)."""

    max_pixels: int
    allow_local_files: bool = False


def image_bytes(url: str, policy: ImagePolicy, param: str) -> bytes:
    """The encoded image a URL carries (data URL) or names (a local file, when allowed).

    Raises:
        ApiError: 400 for a remote URL, a local file that is not allowed or missing, or a malformed data URL.
    """
    if url.startswith("data:"):
        header, comma, payload = url.partition(",")
        if not comma or not header.endswith(";base64"):
            raise ApiError(400, "an image data URL must look like data:image/png;base64,<base64 data>", param=param,
                           code="invalid_image_url")  # fmt: skip
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "the image data URL's payload is not valid base64", param=param,
                           code="invalid_image_url") from None  # fmt: skip
    try:
        parsed = urlparse(url)
    except ValueError as e:  # an unmatched "[" in the host, say
        raise ApiError(400, f"the image URL is malformed ({e}); send a data URL", param=param,
                       code="invalid_image_url") from None  # fmt: skip
    scheme = parsed.scheme.lower()
    if scheme in ("http", "https", "ftp"):
        raise ApiError(400, f"the server does not fetch {scheme}:// URLs; send the image inline as a data URL "
                       "(data:image/png;base64,...)", param=param, code="invalid_image_url")  # fmt: skip
    if scheme not in ("", "file") and len(scheme) > 1:  # one letter: a Windows drive
        raise ApiError(400, f"unsupported image URL scheme {scheme!r}; send a data URL", param=param,
                       code="invalid_image_url")  # fmt: skip
    if not policy.allow_local_files:
        raise ApiError(400, "local image paths are not allowed on this server (start it with --allow-local-files); "
                       "send the image as a data URL", param=param, code="invalid_image_url")  # fmt: skip
    path = Path(unquote(parsed.path)) if scheme == "file" else Path(url)
    try:
        return path.read_bytes()
    except ValueError:  # a NUL byte in the path
        raise ApiError(400, "the image path is malformed", param=param, code="invalid_image_url") from None
    except OSError as e:
        raise ApiError(400, f"cannot read image file {path}: {e.strerror or e}", param=param,
                       code="invalid_image_url") from None  # fmt: skip


def decode(data: bytes, policy: ImagePolicy, param: str, *, show_detail: bool = True) -> Any:
    """An RGB PIL image from encoded bytes; the pixel limit is checked from the header, before decoding.
    ``show_detail=False`` keeps the decoder's detail (the first bytes, for data that is no image) out of the message:
    for a server-side file, whose content the client must not learn through errors.

    Raises:
        ApiError: 400 for data that is no image (code ``invalid_image``) or an image over the pixel limit
            (``image_too_large``).
    """
    from vlkit.data.images import ImageDecodeError, aspect_problem, decode_image, to_rgb

    try:
        image = to_rgb(decode_image(data, max_pixels=policy.max_pixels), key=param)
    except ImageDecodeError as e:
        if e.reason == "too_large":
            raise ApiError(400, f"the image is too large: {e.detail} (this server's --max-image-pixels is "
                           f"{policy.max_pixels})", param=param, code="image_too_large") from None  # fmt: skip
        why = f"{e.reason}: {e.detail}" if show_detail else e.reason
        raise ApiError(400, f"the image cannot be decoded ({why})", param=param, code="invalid_image") from None
    problem = aspect_problem(image.width, image.height)
    if problem is not None:
        raise ApiError(400, f"the image's shape is refused: {problem}", param=param, code="image_too_large")
    return image


def header_pixels(data: bytes) -> int:
    """Width x height from an encoded image's header (nothing decoded); 0 when unreadable (decoding will say why)."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.width * image.height
    except Exception:  # noqa: BLE001 (any failure is decode()'s to report, with its reason)
        return 0


def load_image(url: str, policy: ImagePolicy, param: str) -> Any:
    return decode(image_bytes(url, policy, param), policy, param, show_detail=url.startswith("data:"))


# ------------------------------------------------------------------------------------------------------------ chat


@dataclass
class Conversation:
    """OpenAI messages as NeVA sees them: turns ending with the human one to answer, the one image's URL (its
    placeholder in the first human turn, as `vlkit chat` and LLaVA's training data place it) and the system prompt."""

    turns: list[Any]
    image_url: str | None
    image_param: str | None
    system: str | None


def _text_of(message: Message, i: int) -> tuple[str, list[tuple[str, str]]]:
    """The text of a message (its text parts joined by newlines) and its images as (url, param) pairs."""
    from vlkit.data.conversation import IMAGE_TOKEN

    content = message.content
    if content is None:
        content = ""
    parts = [TextPart(type="text", text=content)] if isinstance(content, str) else content
    texts, images = [], []
    for j, part in enumerate(parts):
        if isinstance(part, TextPart):
            if IMAGE_TOKEN in part.text:
                raise ApiError(400, f"message text must not contain {IMAGE_TOKEN}; send the image as an image_url "
                               "content part", param=f"messages[{i}].content", code="invalid_value")  # fmt: skip
            texts.append(part.text)
        else:
            images.append((part.image_url.url, f"messages[{i}].content[{j}].image_url.url"))
    return "\n".join(texts), images


def conversation(messages: list[Message]) -> Conversation:
    """Turns, image and system prompt of a chat request.

    System (and ``developer``) messages form the system prompt; user messages are human turns and assistant
    messages the model's earlier answers; consecutive messages of one role are joined. The conversation must end
    with a user message and hold at most one image (NeVA sees one image per conversation).

    Raises:
        ApiError: 400 naming the message that breaks these rules.
    """
    from vlkit.data.conversation import GPT, HUMAN, IMAGE_TOKEN, Turn

    system, turns, images = [], [], []
    for i, message in enumerate(messages):
        text, found = _text_of(message, i)
        if message.role in ("system", "developer"):
            if found:
                raise ApiError(400, "a system message cannot hold an image", param=f"messages[{i}].content")
            system.append(text)
            continue
        if found and message.role == "assistant":
            raise ApiError(400, "an assistant message cannot hold an image", param=f"messages[{i}].content")
        images += found
        role = HUMAN if message.role == "user" else GPT
        if turns and turns[-1].role == role:
            turns[-1] = turns[-1]._replace(text=f"{turns[-1].text}\n{text}")
        else:
            turns.append(Turn(role, text))
    if not turns or turns[-1].role != HUMAN:
        raise ApiError(400, "the conversation must end with a user message", param="messages")
    if turns[0].role != HUMAN:
        raise ApiError(400, "the conversation must start with a user message (after any system message)",
                       param="messages")  # fmt: skip
    if len(images) > 1:
        raise ApiError(400, f"at most one image per conversation (this model sees one), got {len(images)}",
                       param=images[1][1], code="too_many_images")  # fmt: skip
    if images:
        turns[0] = turns[0]._replace(text=f"{IMAGE_TOKEN}\n{turns[0].text}")
    url, param = images[0] if images else (None, None)
    return Conversation(turns, url, param, "\n".join(system) if system else None)


def stop_strings(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
        raise ApiError(400, f"stop: up to {MAX_STOP_STRINGS} non-empty strings", param="stop", code="invalid_value")
    return stops
