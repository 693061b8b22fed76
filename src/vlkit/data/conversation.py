"""Conversation templates and their tokenisation with label masking (LLaVA / NeVA instruction data).

A conversation is a list of :class:`Turn` s whose roles alternate ``human`` / ``gpt``, starting with ``human``. A
:class:`Template` renders it into segments of three kinds whose concatenation is the exact text the LLM reads:

* ``PROMPT``: system prompt, user turns, role markup -- not supervised;
* ``TARGET``: each assistant answer with the marker that ends it (``</s>``, ``<|eot_id|>``, ...) -- supervised, so the
  model learns to stop;
* ``IMAGE``: the ``<image>`` placeholder, replaced by one :data:`IMAGE_TOKEN_INDEX` id.

:class:`ConversationTokenizer` tokenises the whole rendered text *once*, with character offsets, and gives each token
the kind of the segment holding its first non-whitespace character (a whitespace-only token: its first character).
Training and generation therefore see exactly the ids the same text gets at inference. A token whose non-whitespace
characters lie in segments of two kinds straddles a boundary: template and tokenizer disagree about where an answer
starts or ends (LLaVA's "tokenization mismatch", where per-turn token counts do not add up to the whole). Such a
sample is fully masked (every label :data:`IGNORE_INDEX`), counted and logged with its id -- never silently trained
on with shifted labels. Samples left without any supervised token are counted and logged too.

The exact strings of every template are listed in docs/data.md ("Conversations (NeVA)").
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import numpy as np

logger = logging.getLogger("vlkit.data.conversation")

#: Label of a position that is not supervised (PyTorch's ``cross_entropy`` default ``ignore_index``).
IGNORE_INDEX = -100
#: The placeholder users write in a human turn where the image goes.
IMAGE_TOKEN = "<image>"
#: The id the placeholder becomes in ``input_ids`` (LLaVA's value). It is not a vocabulary id: the NeVA model finds
#: it and splices the projected image features (``image_token_count`` positions) in its place.
IMAGE_TOKEN_INDEX = -200

PROMPT, TARGET, IMAGE = 0, 1, 2
HUMAN, GPT = "human", "gpt"
# Role names accepted in data files, mapped to the two roles (LLaVA writes human/gpt, chat exports user/assistant).
ROLE_ALIASES = {"human": HUMAN, "user": HUMAN, "gpt": GPT, "assistant": GPT}

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAVA_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the user "
    "provides, and assist the user with a variety of tasks using natural language."
)
# NeMo's SteerLM attribute line that opens every NVGPT assistant turn (a turn's "label" replaces it).
NVGPT_LABEL = (
    "quality:4,toxicity:0,humor:0,creativity:0,helpfulness:4,correctness:4,coherence:4,complexity:4,verbosity:4"
)
# A stand-in answer that ends a generation prompt while it is tokenised (see ConversationTokenizer.prompt): a common
# one-letter word, which tokenizers merge with a preceding space ("Ġa", "▁a") as they do real answers' first words, so
# a space that ends the header goes with the answer, as in training. A rare letter ("x") may stay apart from the
# space ("Ġ" "x"), leaving the prompt with a space token that no training answer was ever preceded by.
_ANSWER_PROBE = "a"
# Warnings per kind of problem and process before only counting goes on (a broken dataset would flood the log).
MAX_WARNINGS = 20


class Turn(NamedTuple):
    """One message: ``role`` is ``"human"`` or ``"gpt"``; ``label`` is NVGPT's attribute line (None: the default)."""

    role: str
    text: str
    label: str | None = None


@dataclass(frozen=True)
class Segment:
    text: str
    kind: int  # PROMPT | TARGET | IMAGE


@dataclass(frozen=True)
class Template:
    """A chat format: how turns become text, and which parts of it are supervised.

    Attributes:
        name: the ``data.conv_template`` value.
        system: the default system prompt ("" for none); a sample's own ``system`` replaces it.
        special_tokens: markup that must be one token of the tokenizer, also when glued to text.
        stop: strings that end an assistant answer; generation stops at them.
        head: ``(system, bos) -> str``, the text before the first user turn (``bos``: the tokenizer's BOS token).
        user: ``(index, text, system) -> str``, user turn ``index`` with its markup (text may hold ``<image>``).
        assistant_header: ``(label) -> str``, the markup that opens an answer (a prompt part).
        answer: ``(text) -> str``, an answer with the marker that ends it (the supervised part).
        plain: stage-1 format: one exchange whose human text is replaced by the image alone.
    """

    name: str
    system: str
    special_tokens: tuple[str, ...]
    stop: tuple[str, ...]
    head: Callable[[str, str], str]
    user: Callable[[int, str, str], str]
    assistant_header: Callable[[str], str]
    answer: Callable[[str], str]
    plain: bool = False

    def check(self, turns: Sequence[Turn], *, has_image: bool) -> str | None:
        """Why ``turns`` cannot be rendered with this template, or None."""
        if not turns:
            return "no turns"
        for i, turn in enumerate(turns):
            expected = HUMAN if i % 2 == 0 else GPT
            if turn.role != expected:
                return f"turn {i} is from {turn.role!r}; turns must alternate human, gpt, ... starting with human"
            if turn.role == GPT and IMAGE_TOKEN in turn.text:
                return f"turn {i} (gpt) contains {IMAGE_TOKEN}; the image belongs in a human turn"
        if not any(t.role == GPT for t in turns):
            return "no gpt turn: nothing to learn from"
        if self.plain:
            if len(turns) != 2:
                return f"the plain template takes one exchange (human, gpt), got {len(turns)} turns"
            if not has_image:
                return "the plain template is for image-caption pairs; this sample has no image"
        return None

    def segments(
        self,
        turns: Sequence[Turn],
        *,
        system: str | None = None,
        bos: str = "",
        add_generation_prompt: bool = False,
    ) -> list[Segment]:
        """The conversation as segments; with ``add_generation_prompt`` (the turns end with a human turn) the
        assistant header is appended as a prompt, without trailing spaces, ready for generation."""
        system = self.system if system is None else system
        out = [Segment(self.head(system, bos), PROMPT)]
        user_index = 0
        for turn in turns:
            if turn.role == HUMAN:
                text = IMAGE_TOKEN if self.plain and IMAGE_TOKEN in turn.text else turn.text
                out += _split_image(self.user(user_index, text, system))
                user_index += 1
            else:
                out.append(Segment(self.assistant_header(turn.label or NVGPT_LABEL), PROMPT))
                out.append(Segment(self.answer(turn.text), TARGET))
        if add_generation_prompt:
            out.append(Segment(self.assistant_header(NVGPT_LABEL), PROMPT))
        return [s for s in out if s.text]


def _split_image(text: str) -> list[Segment]:
    parts = text.split(IMAGE_TOKEN)
    out = [Segment(parts[0], PROMPT)]
    for part in parts[1:]:
        out += [Segment(IMAGE_TOKEN, IMAGE), Segment(part, PROMPT)]
    return out


def _llama2_user(index: int, text: str, system: str) -> str:
    if index == 0 and system:
        text = f"<<SYS>>\n{system}\n<</SYS>>\n\n{text}"
    return f"<s>[INST] {text} "


def _llama3_head(system: str, bos: str) -> str:
    sys_block = f"<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>" if system else ""
    return "<|begin_of_text|>" + sys_block


TEMPLATES: dict[str, Template] = {
    # LLaVA's stage-1 format: [BOS] <image> caption \n -- only the caption (and its newline) is supervised.
    "plain": Template(
        name="plain",
        system="",
        special_tokens=(),
        stop=("\n",),
        head=lambda system, bos: bos,
        user=lambda i, text, system: text,
        assistant_header=lambda label: "",
        answer=lambda text: text + "\n",
        plain=True,
    ),
    # Vicuna v1.1 as LLaVA v1 uses it: "<s>SYSTEM USER: q ASSISTANT: a</s>USER: ..."
    "vicuna_v1": Template(
        name="vicuna_v1",
        system=VICUNA_SYSTEM,
        special_tokens=("<s>", "</s>"),
        stop=("</s>",),
        head=lambda system, bos: "<s>" + (system + " " if system else ""),
        user=lambda i, text, system: f"USER: {text} ",
        assistant_header=lambda label: "ASSISTANT: ",
        answer=lambda text: text + "</s>",
    ),
    # Llama-2-chat: "<s>[INST] <<SYS>>\nSYSTEM\n<</SYS>>\n\nq [/INST] a </s><s>[INST] q2 [/INST] a2 </s>"
    "llama_2": Template(
        name="llama_2",
        system=LLAVA_SYSTEM,
        special_tokens=("<s>", "</s>"),
        stop=("</s>",),
        head=lambda system, bos: "",
        user=_llama2_user,
        assistant_header=lambda label: "[/INST] ",
        answer=lambda text: text + " </s>",
    ),
    # NeMo's NVGPT (SteerLM) format; <extra_id_1> separates turns and ends an answer.
    "nvgpt": Template(
        name="nvgpt",
        system=VICUNA_SYSTEM,
        special_tokens=("<extra_id_0>", "<extra_id_1>", "<extra_id_2>"),
        stop=("<extra_id_1>",),
        head=lambda system, bos: f"<extra_id_0>System\n{system}\n\n<extra_id_1>",
        user=lambda i, text, system: f"User\n{text}\n<extra_id_1>",
        assistant_header=lambda label: f"Assistant\n<extra_id_2>{label}\n",
        answer=lambda text: text + "\n<extra_id_1>",
    ),
    # Llama-3-instruct: header tokens around each role, <|eot_id|> ends every message.
    "llama_3": Template(
        name="llama_3",
        system=LLAVA_SYSTEM,
        special_tokens=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        stop=("<|eot_id|>",),
        head=_llama3_head,
        user=lambda i, text, system: f"<|start_header_id|>user<|end_header_id|>\n\n{text}<|eot_id|>",
        assistant_header=lambda label: "<|start_header_id|>assistant<|end_header_id|>\n\n",
        answer=lambda text: text + "<|eot_id|>",
    ),
}

#: Every special token some template needs, plus padding, unknown, end-of-text and the image placeholder: what a
#: tokenizer trained for vlkit's templates (``vlkit.data.shapes_vqa.train_chat_tokenizer``) registers.
ALL_SPECIAL_TOKENS = (
    "<unk>",  # ids 0, 1, 2 as in LLaMA's vocabulary (and LLMConfig's default bos/eos ids)
    "<s>",
    "</s>",
    "<pad>",
    IMAGE_TOKEN,
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<extra_id_0>",
    "<extra_id_1>",
    "<extra_id_2>",
)


def get_template(name: str) -> Template:
    """The template called ``name`` (``plain``, ``vicuna_v1``, ``llama_2``, ``nvgpt``, ``llama_3``)."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown conversation template {name!r}; choose from {', '.join(TEMPLATES)}") from None


# ---------------------------------------------------------------------------------------------------- tokenisation


@dataclass
class Tokenized:
    """One tokenised conversation.

    Attributes:
        input_ids: token ids with :data:`IMAGE_TOKEN_INDEX` where each image goes.
        labels: the id at supervised positions (assistant answers and their end markers), :data:`IGNORE_INDEX`
            elsewhere; aligned with ``input_ids`` (the loss shifts by one).
        num_images: how many :data:`IMAGE_TOKEN_INDEX` ids ``input_ids`` holds.
        mismatch: template and tokenizer disagreed on a boundary; the labels are all :data:`IGNORE_INDEX`.
        truncated: text was cut to fit the context (see :func:`fit_to_context`).
    """

    input_ids: list[int]
    labels: list[int]
    num_images: int = 0
    mismatch: bool = False
    truncated: bool = False

    @property
    def num_supervised(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


@dataclass
class ConversationTokenizer:
    """Render conversations with a template and tokenise them into ``input_ids`` and masked ``labels``.

    Args:
        tokenizer: a :class:`vlkit.data.tokenizer.HFTokenizer` (``get_tokenizer(dir_with_tokenizer.json)``) or a
            ``tokenizers.Tokenizer``. It must give character offsets; its own BOS/EOS adding is not used (the
            template writes its markup itself).
        template: a :class:`Template` or its name.

    Raises:
        ValueError: a special token of the template is not a single token of the tokenizer (also when glued to
            text): every sample would be mis-tokenised, so this fails up front.

    Attributes:
        counts: ``samples``, ``tokenization_mismatch`` and ``all_masked`` seen by this object (in this process).
    """

    tokenizer: Any
    template: Template | str
    counts: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        if isinstance(self.template, str):
            self.template = get_template(self.template)
        self._tok = getattr(self.tokenizer, "tokenizer", self.tokenizer)  # HFTokenizer wraps a tokenizers.Tokenizer
        if not hasattr(self._tok, "encode") or not hasattr(self._tok, "token_to_id"):
            raise TypeError(
                f"{type(self.tokenizer).__name__} is not a Hugging Face tokenizer; conversations need a "
                "tokenizer.json tokenizer (get_tokenizer('<dir with tokenizer.json>'))"
            )
        self._check_special_tokens()
        bos_id = getattr(self.tokenizer, "bos_token_id", None)
        self.bos_token = self._tok.id_to_token(bos_id) if bos_id is not None else ""
        self._warn = WarningLimiter(logger)

    def _check_special_tokens(self) -> None:
        name = getattr(self.tokenizer, "name", "the tokenizer")
        for token in self.template.special_tokens:
            token_id = self._tok.token_to_id(token)
            if token_id is None:
                raise ValueError(
                    f"conversation template {self.template.name!r} needs {token!r}, which {name} does not have; "
                    "add it as a special token, or choose the template the model was trained with"
                )
            glued = self._tok.encode(f"a{token}a", add_special_tokens=False).ids
            if token_id not in glued:
                raise ValueError(
                    f"{name} splits {token!r} when it touches text (it is in the vocabulary but not an added "
                    f"special token), so template {self.template.name!r} would mis-tokenise every sample; register "
                    "it as a special token"
                )

    @property
    def stop_token_ids(self) -> list[int]:
        """Ids of the template's stop strings that are single tokens (for generation's eos ids)."""
        ids = (self._tok.token_to_id(s) for s in self.template.stop)
        return [i for i in ids if i is not None]

    def render(self, turns: Sequence[Turn], *, system: str | None = None, add_generation_prompt: bool = False) -> str:
        """The text the LLM reads for ``turns`` (``<image>`` where the image goes)."""
        segs = self.template.segments(
            turns, system=system, bos=self.bos_token, add_generation_prompt=add_generation_prompt
        )
        return "".join(s.text for s in segs)

    def __call__(self, turns: Sequence[Turn], *, system: str | None = None, sample_id: str = "") -> Tokenized:
        """Tokenise a training conversation (ending with an answer); problems are counted and logged."""
        segs = self.template.segments(turns, system=system, bos=self.bos_token)
        out = self._encode(segs)
        self.counts["samples"] += 1
        if out.mismatch:
            self.counts["tokenization_mismatch"] += 1
            self._warn(
                "tokenization_mismatch",
                "sample %r: tokenization mismatch: a token of %s spans the boundary between prompt, answer or "
                "image (template %r); the sample is fully masked",
                sample_id,
                getattr(self.tokenizer, "name", "the tokenizer"),
                self.template.name,
            )
        if out.num_supervised == 0:
            self.counts["all_masked"] += 1
            if not out.mismatch:
                self._warn("all_masked", "sample %r: no supervised token (empty answers?)", sample_id)
        return out

    def prompt(self, turns: Sequence[Turn], *, system: str | None = None) -> list[int]:
        """Ids of a generation prompt: ``turns`` end with the human turn to answer; the assistant header follows.

        The ids are those that precede an answer in training. How a tokenizer splits the header's trailing
        whitespace depends on what follows it ("ASSISTANT: red" gives ``:`` ``Ġred``; "\n\nred" may give
        ``Ċ`` ``Ċ`` ``red``), so the prompt is tokenised with a one-letter answer after it and cut where that starts.
        """
        if not turns or turns[-1].role != HUMAN:
            raise ValueError("a generation prompt ends with a human turn")
        segs = self.template.segments(turns, system=system, bos=self.bos_token, add_generation_prompt=True)
        probed = self._encode([*segs, Segment(_ANSWER_PROBE, TARGET)])
        if probed.mismatch:  # the probe merged into the header: fall back to the header's own tokens
            return self._encode(segs).input_ids
        answer_start = len(probed.labels)  # the probe's tokens are the supervised ones at the end
        while answer_start > 0 and probed.labels[answer_start - 1] != IGNORE_INDEX:
            answer_start -= 1
        return probed.input_ids[:answer_start]

    def _encode(self, segs: list[Segment]) -> Tokenized:
        text = "".join(s.text for s in segs)
        enc = self._tok.encode(text, add_special_tokens=False)
        ids = enc.ids
        if not ids:
            return Tokenized([], [])
        kinds, seg_index, straddle = _token_segments(text, segs, enc.offsets)
        input_ids: list[int] = []
        labels: list[int] = []
        num_images, last_image_seg = 0, -1
        for token_id, kind, seg in zip(ids, kinds.tolist(), seg_index.tolist()):
            if kind == IMAGE:
                if seg == last_image_seg:  # the placeholder's other pieces ("<", "image", ">")
                    continue
                last_image_seg = seg
                num_images += 1
                input_ids.append(IMAGE_TOKEN_INDEX)
                labels.append(IGNORE_INDEX)
                continue
            input_ids.append(token_id)
            labels.append(token_id if kind == TARGET and not straddle else IGNORE_INDEX)
        return Tokenized(input_ids, labels, num_images=num_images, mismatch=straddle)


class WarningLimiter:
    """Log the first ``limit`` warnings of each kind in this process, then only count (a broken dataset would
    otherwise flood the log); the last one logged says so."""

    def __init__(self, log: logging.Logger, limit: int = MAX_WARNINGS) -> None:
        self.log, self.limit = log, limit
        self.seen: Counter = Counter()

    def __call__(self, kind: str, message: str, *args: Any) -> None:
        self.seen[kind] += 1
        if self.seen[kind] <= self.limit:
            suffix = f"; further {kind} warnings are counted, not logged" if self.seen[kind] == self.limit else ""
            self.log.warning(message + suffix, *args)


def _token_segments(text: str, segs: list[Segment], offsets: Sequence[tuple[int, int]]) -> tuple[Any, Any, bool]:
    """(kind per token, segment index per token, whether some token straddles segments of different kinds)."""
    n = len(text)
    lengths = [len(s.text) for s in segs]
    seg_of_char = np.repeat(np.arange(len(segs)), lengths)
    kind_of_seg = np.array([s.kind for s in segs], dtype=np.int64)
    kind_of_char = kind_of_seg[seg_of_char]
    solid = np.fromiter((not c.isspace() for c in text), dtype=bool, count=n)
    bounds = np.asarray(offsets, dtype=np.int64).reshape(-1, 2).clip(0, n)
    starts, ends = bounds[:, 0], bounds[:, 1]
    # Non-whitespace characters of each kind before every position: a token's count of each is a difference.
    cum = np.zeros((3, n + 1), dtype=np.int64)
    for kind in (PROMPT, TARGET, IMAGE):
        np.cumsum(solid & (kind_of_char == kind), out=cum[kind, 1:])
    kinds_in_token = ((cum[:, ends] - cum[:, starts]) > 0).sum(axis=0)
    straddle = bool((kinds_in_token > 1).any())
    # The first non-whitespace character at or after each token start, if inside the token; else the start itself.
    solid_pos = np.flatnonzero(solid)
    first = np.searchsorted(solid_pos, starts)
    first_solid = np.where(first < len(solid_pos), solid_pos[np.minimum(first, len(solid_pos) - 1)], n)
    anchor = np.where(first_solid < ends, first_solid, starts).clip(0, max(n - 1, 0))
    seg_index = seg_of_char[anchor]
    return kind_of_seg[seg_index], seg_index, straddle


def fit_to_context(sample: Tokenized, max_length: int, image_tokens: int) -> Tokenized | None:
    """Cut a sample's text so that the sequence *after splicing* fits ``max_length`` positions.

    Each image id stands for ``image_tokens`` positions once the model splices the image features in, so the text
    may keep ``max_length - num_images * (image_tokens - 1)`` ids. Text is cut from the end.

    Args:
        sample: the tokenised conversation.
        max_length: the LLM's context length.
        image_tokens: positions per image after splicing (see ``vlkit.data.llava.image_token_count``).

    Returns:
        The sample (marked ``truncated`` if cut), or None when even an image placeholder would be cut off.
    """
    budget = max_length - sample.num_images * (image_tokens - 1)
    if len(sample.input_ids) <= budget:
        return sample
    if sample.num_images:
        last_image = len(sample.input_ids) - 1 - sample.input_ids[::-1].index(IMAGE_TOKEN_INDEX)
        if last_image >= budget:
            return None
    if budget <= 0:
        return None
    return replace(sample, input_ids=sample.input_ids[:budget], labels=sample.labels[:budget], truncated=True)


def turns_from_json(conversations: Sequence[dict], where: str = "") -> list[Turn]:
    """LLaVA's ``[{"from": "human"|"gpt", "value": str}, ...]`` (also user/assistant) as :class:`Turn` s.

    Raises:
        ValueError: a malformed turn; the message starts with ``where``.
    """
    prefix = f"{where}: " if where else ""
    if not isinstance(conversations, list) or not conversations:
        raise ValueError(f"{prefix}'conversations' must be a non-empty list")
    turns = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            raise ValueError(f"{prefix}conversations[{i}] is a {type(turn).__name__}, not an object")
        role, value, label = turn.get("from"), turn.get("value"), turn.get("label")
        if role not in ROLE_ALIASES:
            raise ValueError(f"{prefix}conversations[{i}].from is {role!r}; expected one of {', '.join(ROLE_ALIASES)}")
        if not isinstance(value, str):
            raise ValueError(f"{prefix}conversations[{i}].value is {type(value).__name__}, not a string")
        if label is not None and not isinstance(label, str):
            raise ValueError(f"{prefix}conversations[{i}].label is {type(label).__name__}, not a string")
        turns.append(Turn(ROLE_ALIASES[role], value, label))
    return turns


def template_with_system(name: str, system: str | None) -> Template:
    """The conversation template ``name`` with its default system prompt replaced by ``system`` (None: kept)."""
    template = get_template(name)
    return template if system is None else replace(template, system=system)
