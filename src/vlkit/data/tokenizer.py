"""Tokenizers: the exact CLIP BPE tokenizer and Hugging Face tokenizer files, behind one call contract.

Every tokenizer returned by :func:`get_tokenizer` is a callable ``tok(texts) -> LongTensor[B, T]`` (a single string
is a batch of one) with ``encode(text) -> list[int]`` (no special tokens) and ``decode(ids) -> str``.

:class:`CLIPTokenizer` gives the ids of OpenAI CLIP / open_clip's ``SimpleTokenizer`` on every string (ftfy, HTML
unescaping twice, whitespace clean, lower case, CLIP's pre-tokenizer regex, byte-level BPE with ``</w>`` word ends,
``<start_of_text>``/``<end_of_text>``, 77 positions padded with 0, truncation keeping ``<end_of_text>`` last), several
times faster, because:

* ftfy and ``html.unescape`` are skipped for strings on which they are provably the identity: printable ASCII
  without ``&`` (most captions), and one-line NFC text without HTML, curly quotes, control, full-width or ligature
  characters in which ftfy's own mojibake test finds nothing (see :func:`clean_text`);
* CLIP's regex never matches a space, so a cleaned caption is split on spaces and each space-separated chunk is
  tokenized once and cached (``dog,`` and ``dog`` are two cache entries); a long caption stops once it has filled
  the context;
* a chunk the cache has not seen goes through the regex and the Rust BPE of Hugging Face ``tokenizers`` (built from
  the same vocabulary and merges), word by word, each word cached too.
"""

from __future__ import annotations

import gzip
import html
import json
import os
import re
import unicodedata
from collections.abc import Iterable, Sequence
from functools import lru_cache
from itertools import chain, islice
from pathlib import Path
from typing import Any, Union

import ftfy
import numpy as np
import regex
import torch

DEFAULT_CONTEXT_LENGTH = 77
CLIP_BPE_PATH = Path(__file__).resolve().parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
# OpenAI kept the first 49152 - 256 - 2 merges of the file, so that 2 x 256 byte symbols + merges + 2 specials
# make the 49408-token vocabulary every public CLIP checkpoint was trained with.
CLIP_NUM_MERGES = 49152 - 256 - 2
CLIP_NAMES = ("clip", "openai", "openai-clip", "clip-bpe", "open_clip")
_WORD_END = "</w>"
# (start, end) special-token names: open_clip's, then Hugging Face's CLIPTokenizer files.
_CLIP_SPECIALS = (("<start_of_text>", "<end_of_text>"), ("<|startoftext|>", "<|endoftext|>"))
# CLIP's pre-tokenizer after its special tokens (added in front, escaped). Compiled with `regex` (Unicode classes)
# and IGNORECASE, as in OpenAI's code, so that even case-folding quirks (``'ſ`` matching ``'s``) give the same words.
_CLIP_WORDS = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# Chunks and words longer than this are tokenized but not cached: they are rare, and would bloat the caches.
_MAX_CACHED_LEN = 64

TextInput = Union[str, Sequence[str]]

# Tier 1 of the cleaning. On printable ASCII without '&' (tab, newline and carriage return allowed), ftfy and
# html.unescape cannot act: ftfy leaves ASCII encodings alone, its other fixers look for non-ASCII characters, HTML
# entities (which need '&'), terminal escapes (ESC) and control characters, and only rewrite line breaks ('\r'), which
# whitespace cleaning removes anyway; NFC does not change ASCII. A match of this pattern leaves tier 1.
_NOT_PLAIN_ASCII = re.compile(r"[^\t\n\r\x20-\x25\x27-\x7e]")
# The ftfy version whose fixers tier 2 below was derived from; another set of fixers disables tier 2.
_FTFY_FIXERS = frozenset(
    ("unescape_html", "remove_terminal_escapes", "fix_encoding", "restore_byte_a0", "replace_lossy_sequences",
     "decode_inconsistent_utf8", "fix_c1_controls", "fix_latin_ligatures", "fix_character_width", "uncurl_quotes",
     "fix_line_breaks", "fix_surrogates", "remove_control_chars", "normalization", "max_decode_length", "explain")
)  # fmt: skip


def _char_class(codepoints: Iterable[int]) -> str:
    """A regex character class matching exactly ``codepoints`` (as escaped ranges)."""
    points = sorted(set(codepoints))
    parts, i = [], 0
    while i < len(points):
        j = i
        while j + 1 < len(points) and points[j + 1] == points[j] + 1:
            j += 1
        parts.append(f"\\U{points[i]:08x}" + (f"-\\U{points[j]:08x}" if j > i else ""))
        i = j + 1
    return "[" + "".join(parts) + "]"


def _ftfy_tier2() -> tuple[re.Pattern[str], Any] | None:
    """(characters some ftfy fixer other than fix_encoding acts on, ftfy's mojibake test), or None.

    Tier 2 of the cleaning: a one-line string without '&' and without these characters, in NFC, on which ftfy's own
    mojibake heuristic (``is_bad``, the test ``fix_encoding`` starts with) finds nothing, is returned unchanged by
    ``ftfy.fix_text`` (one segment; every fixer of ftfy 6's list is then the identity), so ftfy can be skipped.
    """
    try:
        from ftfy import TextFixerConfig, chardata
        from ftfy.badness import is_bad

        if set(TextFixerConfig._fields) != _FTFY_FIXERS:
            return None
        touched = {*chardata.LIGATURES, *chardata.WIDTH_MAP, *chardata.CONTROL_CHARS}
    except (ImportError, AttributeError):
        return None
    touched |= {ord(c) for c in "&\n\r\x1b\u02bc\u2028\u2029"}  # HTML, line breaks, terminal escapes, curly quote
    touched |= {*range(0x80, 0xA0), *range(0x2018, 0x2020), *range(0xD800, 0xE000)}  # C1, curly quotes, surrogates
    return re.compile(_char_class(touched)), is_bad


_TIER2 = _ftfy_tier2()


def _ftfy_is_identity(text: str) -> bool:
    if _TIER2 is None or len(text) > 100_000:
        return False
    touched, is_bad = _TIER2
    return touched.search(text) is None and unicodedata.is_normalized("NFC", text) and not is_bad(text)


def clean_text(text: str) -> str:
    """Clean a caption as OpenAI CLIP does: ftfy, HTML-unescape twice, collapse whitespace, lower case.

    ftfy and the unescaping are skipped where they provably cannot change the text (see ``_NOT_PLAIN_ASCII`` and
    ``_ftfy_tier2``); the parity tests compare every path with open_clip.

    Args:
        text: any string.

    Returns:
        The cleaned string: words separated by single spaces, no leading or trailing space.
    """
    if _NOT_PLAIN_ASCII.search(text) is None or _ftfy_is_identity(text):
        return " ".join(text.split()).lower()
    return " ".join(html.unescape(html.unescape(ftfy.fix_text(text))).split()).lower()


def cleaning_path(text: str) -> str:
    """Which cleaning :func:`clean_text` applies: ``"ascii"``, ``"unicode"`` (ftfy provably a no-op) or ``"ftfy"``."""
    if _NOT_PLAIN_ASCII.search(text) is None:
        return "ascii"
    return "unicode" if _ftfy_is_identity(text) else "ftfy"


@lru_cache(maxsize=1)
def _byte_symbols() -> tuple[str, ...]:
    """GPT-2's reversible map from a byte (the index) to a printable character that BPE can work on.

    Bytes that are already printable Latin-1 stand for themselves; the others (controls, space, soft hyphen) borrow
    the characters from U+0100 on, in byte order.
    """
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    symbols, spare = [], 0x100
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(spare))
            spare += 1
    return tuple(symbols)


def clip_base_vocab() -> list[str]:
    """The first 512 tokens of CLIP's vocabulary, in id order: the byte symbols, then each with ``</w>`` appended.

    OpenAI listed the printable bytes first and the remapped ones after, so the id order is not the byte order.
    """
    symbols = _byte_symbols()
    order = [b for b in range(256) if symbols[b] == chr(b)] + [b for b in range(256) if symbols[b] != chr(b)]
    base = [symbols[b] for b in order]
    return base + [s + _WORD_END for s in base]


def read_merges(path: str | os.PathLike, limit: int | None = CLIP_NUM_MERGES) -> list[tuple[str, str]]:
    """Read a BPE merge list: OpenAI's ``bpe_simple_vocab_16e6.txt[.gz]`` or a Hugging Face ``merges.txt``.

    Args:
        path: the file; gzip-compressed when its name ends in ``.gz``.
        limit: keep only the first ``limit`` merges (CLIP uses 48 894 of the file's 262 143); None keeps all.

    Returns:
        The merges in rank order, as pairs of symbols.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        # The first line is a version header in both formats ("#version: 0.2", OpenAI's with its file name in front).
        lines = (line.rstrip("\n") for line in islice(f, 1, None))
        merges = []
        for line in lines:
            if limit is not None and len(merges) >= limit:
                break
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2:
                raise ValueError(f"{path}: not a BPE merges file (line {len(merges) + 2!s}: {line[:80]!r})")
            merges.append((parts[0], parts[1]))
    return merges


class CLIPTokenizer:
    """Byte-level BPE tokenizer with OpenAI CLIP's exact semantics (the ids of open_clip's ``SimpleTokenizer``).

    Args:
        vocab: token -> id, including the two special tokens.
        merges: BPE merges in rank order.
        bos_token: the start-of-text token (prepended by :meth:`__call__`).
        eos_token: the end-of-text token (appended; kept last when a text is truncated).
        context_length: default number of positions of :meth:`__call__`'s output.
        cache_size: chunks (and words) remembered before the cache is emptied and refilled.
    """

    pad_token_id = 0

    def __init__(
        self,
        vocab: dict[str, int],
        merges: Sequence[tuple[str, str]],
        *,
        bos_token: str = "<start_of_text>",
        eos_token: str = "<end_of_text>",
        context_length: int = DEFAULT_CONTEXT_LENGTH,
        cache_size: int = 1 << 18,
    ):
        for token in (bos_token, eos_token):
            if token not in vocab:
                raise ValueError(f"the vocabulary has no {token!r} token")
        self.vocab = dict(vocab)
        self.merges = [tuple(m) for m in merges]
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_token_id, self.eos_token_id = self.vocab[bos_token], self.vocab[eos_token]
        self.all_special_ids = [self.bos_token_id, self.eos_token_id]
        self.context_length = context_length
        self.cache_size = cache_size
        self.vocab_size = len(self.vocab)
        specials = f"{regex.escape(bos_token)}|{regex.escape(eos_token)}|"
        self._pattern = regex.compile(specials + _CLIP_WORDS, regex.IGNORECASE)
        self._byte_map = {b: s for b, s in enumerate(_byte_symbols())}
        self._init_runtime()

    # open_clip names, for code written against it.
    @property
    def sot_token_id(self) -> int:
        return self.bos_token_id

    @property
    def eot_token_id(self) -> int:
        return self.eos_token_id

    @classmethod
    def from_bpe_file(
        cls, path: str | os.PathLike | None = None, context_length: int = DEFAULT_CONTEXT_LENGTH
    ) -> CLIPTokenizer:
        """CLIP's tokenizer from an OpenAI BPE file (default: the copy shipped with vlkit) or a ``merges.txt``.

        The vocabulary is derived from the merges as OpenAI does: byte symbols, the same with ``</w>``, one token
        per merge, then ``<start_of_text>`` and ``<end_of_text>``.
        """
        merges = _cached_merges(str(path or CLIP_BPE_PATH))
        tokens = clip_base_vocab() + ["".join(m) for m in merges] + list(_CLIP_SPECIALS[0])
        return cls({t: i for i, t in enumerate(tokens)}, merges, context_length=context_length)

    @classmethod
    def from_vocab_merges(
        cls, vocab_file: str | os.PathLike, merges_file: str | os.PathLike, context_length: int = DEFAULT_CONTEXT_LENGTH
    ) -> CLIPTokenizer:
        """CLIP's tokenizer from Hugging Face ``CLIPTokenizer`` files (``vocab.json`` + ``merges.txt``)."""
        vocab = json.loads(Path(vocab_file).read_text(encoding="utf-8"))
        bos, eos = _clip_specials_in(vocab)
        if bos is None:
            raise ValueError(f"{vocab_file}: not a CLIP vocabulary (no <|startoftext|>/<|endoftext|> tokens)")
        merges = read_merges(merges_file, limit=None)
        return cls(vocab, merges, bos_token=bos, eos_token=eos, context_length=context_length)

    def _init_runtime(self) -> None:
        """The parts rebuilt after unpickling: the Rust BPE model, the caches and the id -> bytes table."""
        from tokenizers import models

        self._bpe = models.BPE(self.vocab, self.merges, end_of_word_suffix=_WORD_END)
        self._chunk_cache: dict[str, list[int]] = {}
        self._word_cache: dict[str, list[int]] = {}
        self._reset_word_cache()
        self._id_bytes: list[bytes] | None = None  # built by the first decode()

    def _build_id_bytes(self) -> list[bytes]:
        byte_of = {s: b for b, s in enumerate(_byte_symbols())}
        table = [b""] * (max(self.vocab.values()) + 1)
        for token, i in self.vocab.items():
            if i in self.all_special_ids:
                table[i] = token.encode()
                continue
            word_end = token.endswith(_WORD_END)
            body = token[: -len(_WORD_END)] if word_end else token
            try:
                raw = bytes(byte_of[c] for c in body)
            except KeyError:  # a foreign vocabulary with symbols outside the byte map: keep them as text
                raw = b"".join(bytes([byte_of[c]]) if c in byte_of else c.encode() for c in body)
            table[i] = raw + b" " if word_end else raw
        return table

    def _reset_word_cache(self) -> None:
        # A special token in the text is kept whole by the regex and maps to its id, as in OpenAI's code.
        self._word_cache.clear()
        self._word_cache.update({self.bos_token: [self.bos_token_id], self.eos_token: [self.eos_token_id]})

    def __getstate__(self) -> dict[str, Any]:
        skip = {"_bpe", "_chunk_cache", "_word_cache", "_id_bytes"}
        return {k: v for k, v in self.__dict__.items() if k not in skip}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    def _word_ids(self, word: str) -> list[int]:
        ids = self._word_cache.get(word)
        if ids is None:
            symbols = word.encode("utf-8").decode("latin-1").translate(self._byte_map)
            ids = [t.id for t in self._bpe.tokenize(symbols)]
            if len(word) <= _MAX_CACHED_LEN:
                if len(self._word_cache) >= self.cache_size:
                    self._reset_word_cache()
                self._word_cache[word] = ids
        return ids

    def _chunk_ids(self, chunk: str) -> list[int]:
        ids: list[int] = []
        for word in self._pattern.findall(chunk):
            ids += self._word_ids(word)
        if len(chunk) <= _MAX_CACHED_LEN:
            if len(self._chunk_cache) >= self.cache_size:
                self._chunk_cache.clear()
            self._chunk_cache[chunk] = ids
        return ids

    def _chunk_parts(self, text: str, limit: int | None = None) -> list[list[int]]:
        """The ids of each space-separated chunk of the cleaned text; with ``limit``, possibly only the first chunks,
        as many as make ``limit`` ids (CLIP's regex never matches a space, so chunks tokenize independently)."""
        if _NOT_PLAIN_ASCII.search(text) is None:
            chunks = text.lower().split()  # == clean_text(text).split(" ") for these strings
        else:
            chunks = clean_text(text).split(" ")
        if limit is not None and len(chunks) > limit:
            parts, count = [], 0
            for chunk in chunks:
                ids = self._chunk_cache.get(chunk)
                parts.append(self._chunk_ids(chunk) if ids is None else ids)
                count += len(parts[-1])
                if count >= limit:
                    break
            return parts
        parts = list(map(self._chunk_cache.get, chunks))
        if not all(parts):  # a chunk not seen yet (or one without tokens, which is cheap to redo)
            parts = [self._chunk_ids(c) if p is None else p for p, c in zip(parts, chunks)]
        return parts

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without the start/end tokens and without truncation."""
        return list(chain.from_iterable(self._chunk_parts(text)))

    def __call__(self, texts: TextInput, context_length: int | None = None) -> torch.Tensor:
        """Tokenize a batch: ``<start_of_text>`` ids ``<end_of_text>``, padded with 0 or truncated.

        Args:
            texts: a string or a list of strings.
            context_length: positions per row; default ``self.context_length`` (77).

        Returns:
            LongTensor [len(texts), context_length]. A text too long for it keeps its first
            ``context_length - 2`` tokens and still ends with ``<end_of_text>``.
        """
        if isinstance(texts, str):
            texts = [texts]
        length = context_length or self.context_length
        if length < 2:
            raise ValueError(f"context_length must be at least 2 (start and end tokens), got {length}")
        keep = length - 2
        flat: list[int] = []
        lengths: list[int] = []
        for text in texts:
            start = len(flat)
            flat.extend(chain.from_iterable(self._chunk_parts(text, keep)))
            if len(flat) - start > keep:
                del flat[start + keep :]
            lengths.append(len(flat) - start)
        return _pack(flat, lengths, length, self.bos_token_id, self.eos_token_id, self.pad_token_id)

    def decode(self, ids: Iterable[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of a sequence of ids (one row of :meth:`__call__`'s output, or :meth:`encode`'s list).

        Args:
            ids: token ids.
            skip_special_tokens: drop the start/end tokens and everything after the first end token (the padding).

        Returns:
            The words, separated by spaces: the cleaned text up to spacing around punctuation and digits.
        """
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode takes one sequence (a 1-D tensor), got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            if self.eos_token_id in ids:
                ids = ids[: ids.index(self.eos_token_id)]
            ids = [i for i in ids if i not in self.all_special_ids]
        if self._id_bytes is None:
            self._id_bytes = self._build_id_bytes()
        return b"".join(self._id_bytes[i] for i in ids).decode("utf-8", errors="replace").strip()

    def __repr__(self) -> str:
        return f"CLIPTokenizer(vocab_size={self.vocab_size}, context_length={self.context_length})"


@lru_cache(maxsize=4)
def _cached_merges(path: str) -> list[tuple[str, str]]:
    return read_merges(path)


def _clip_specials_in(vocab: dict[str, int]) -> tuple[str | None, str | None]:
    for bos, eos in _CLIP_SPECIALS:
        if bos in vocab and eos in vocab:
            return bos, eos
    return None, None


def _pack(flat: list[int], lengths: list[int], length: int, bos: int | None, eos: int | None, pad: int) -> torch.Tensor:
    """Rows of ``[bos] ids [eos] pad...`` of ``length`` positions from concatenated ids (scattered, not looped)."""
    n = len(lengths)
    out = np.full((n, length), pad, dtype=np.int64)
    if n == 0:
        return torch.from_numpy(out)
    counts = np.asarray(lengths, dtype=np.int64)
    start = 1 if bos is not None else 0
    if bos is not None:
        out[:, 0] = bos
    if flat:
        rows = np.repeat(np.arange(n), counts)
        first = np.cumsum(counts) - counts
        cols = np.arange(len(flat)) - np.repeat(first, counts) + start
        out[rows, cols] = np.asarray(flat, dtype=np.int64)
    if eos is not None:
        out[np.arange(n), counts + start] = eos
    return torch.from_numpy(out)


class HFTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer (``tokenizer.json``) behind vlkit's call contract.

    Args:
        tokenizer: the ``tokenizers.Tokenizer``; its own padding and truncation settings are switched off.
        context_length: default positions of :meth:`__call__`; None pads each batch to its longest row.
        pad_token_id / bos_token_id / eos_token_id: overrides of what is read from the tokenizer (see
            :meth:`from_file`).
        name: where it came from, for messages.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        context_length: int | None = None,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        name: str = "tokenizer.json",
    ):
        padding = tokenizer.padding
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.name = name
        if pad_token_id is None and padding is not None:
            pad_token_id = padding.get("pad_id")
        self.pad_token_id = pad_token_id if pad_token_id is not None else self._first_id(_PAD_NAMES)
        self.bos_token_id = bos_token_id if bos_token_id is not None else self._first_id(_BOS_NAMES)
        self.eos_token_id = eos_token_id if eos_token_id is not None else self._first_id(_EOS_NAMES)
        if self.pad_token_id is None:
            self.pad_token_id = 0
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_file(cls, path: str | os.PathLike, context_length: int | None = None) -> HFTokenizer:
        """Load ``tokenizer.json``; pad/bos/eos tokens come from a ``tokenizer_config.json`` or
        ``special_tokens_map.json`` next to it when present, else from common token names."""
        from tokenizers import Tokenizer

        path = Path(path)
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:
            raise ValueError(f"{path}: not a Hugging Face tokenizer.json ({e})") from e
        names = _special_names(path.parent)
        ids = {k: tokenizer.token_to_id(v) for k, v in names.items()}
        return cls(
            tokenizer,
            context_length=context_length,
            pad_token_id=ids.get("pad_token"),
            bos_token_id=ids.get("bos_token"),
            eos_token_id=ids.get("eos_token"),
            name=str(path),
        )

    def _first_id(self, names: Sequence[str]) -> int | None:
        for name in names:
            i = self.tokenizer.token_to_id(name)
            if i is not None:
                return i
        return None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of one text (by default without the special tokens the tokenizer's template adds)."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(self, texts: TextInput, context_length: int | None = None) -> torch.Tensor:
        """Tokenize a batch with the tokenizer's special tokens, pad with ``pad_token_id``.

        Args:
            texts: a string or a list of strings.
            context_length: positions per row; default ``self.context_length``, or the longest row when None.
                A longer row is cut, and keeps its end-of-sequence token last if it had one.

        Returns:
            LongTensor [len(texts), T].
        """
        if isinstance(texts, str):
            texts = [texts]
        rows = [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=True)]
        length = context_length or self.context_length or max((len(r) for r in rows), default=0)
        flat: list[int] = []
        lengths: list[int] = []
        for ids in rows:
            if len(ids) > length:
                ends_with_eos = self.eos_token_id is not None and ids[-1] == self.eos_token_id
                ids = ids[:length]
                if ends_with_eos:
                    ids[-1] = self.eos_token_id
            flat += ids
            lengths.append(len(ids))
        return _pack(flat, lengths, length, None, None, self.pad_token_id)

    def decode(self, ids: Iterable[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of a sequence of ids; padding after the end-of-sequence token is dropped with the special tokens."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name!r}, vocab_size={self.vocab_size}, context_length={self.context_length})"


_PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>", "<unk>")
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<|startoftext|>", "<start_of_text>", "[CLS]", "<bos>")
_EOS_NAMES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<end_of_text>", "[SEP]", "<eos>", "<|im_end|>")


def _special_names(directory: Path) -> dict[str, str]:
    """pad/bos/eos token names from the transformers config files next to a tokenizer.json, when there are any."""
    names: dict[str, str] = {}
    for file in ("special_tokens_map.json", "tokenizer_config.json"):  # the later file wins
        try:
            data = json.loads((directory / file).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for key in ("pad_token", "bos_token", "eos_token"):
            value = data.get(key)
            if isinstance(value, dict):  # a serialized AddedToken
                value = value.get("content")
            if isinstance(value, str):
                names[key] = value
    return names


def _is_clip_vocab(vocab_file: Path) -> bool:
    try:
        vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(vocab, dict) and _clip_specials_in(vocab)[0] is not None and ("a" + _WORD_END) in vocab


def _from_path(path: Path, context_length: int | None) -> CLIPTokenizer | HFTokenizer:
    clip_length = context_length or DEFAULT_CONTEXT_LENGTH
    if path.is_dir():
        vocab, merges, tok_json = path / "vocab.json", path / "merges.txt", path / "tokenizer.json"
        # CLIP checkpoints ship both; their tokenizer.json skips ftfy and HTML unescaping, so prefer the exact BPE.
        if vocab.is_file() and merges.is_file() and _is_clip_vocab(vocab):
            return CLIPTokenizer.from_vocab_merges(vocab, merges, context_length=clip_length)
        if tok_json.is_file():
            return HFTokenizer.from_file(tok_json, context_length=context_length)
        if vocab.is_file() and merges.is_file():
            raise ValueError(
                f"{path}: vocab.json + merges.txt that are not CLIP's (no <|startoftext|> or '</w>' tokens); "
                "add the tokenizer's tokenizer.json to load it"
            )
        raise ValueError(f"{path}: no tokenizer.json, and no vocab.json + merges.txt, in this directory")
    name = path.name.lower()
    if name in ("vocab.json", "merges.txt"):
        return _from_path(path.parent, context_length)
    if name.endswith(".json"):
        return HFTokenizer.from_file(path, context_length=context_length)
    if name.endswith((".txt", ".txt.gz")):
        return CLIPTokenizer.from_bpe_file(path, context_length=clip_length)
    raise ValueError(f"{path}: unknown tokenizer file (expected tokenizer.json, or a CLIP BPE .txt / .txt.gz file)")


def get_tokenizer(
    name_or_path: str | os.PathLike | None = "clip", context_length: int | None = None
) -> CLIPTokenizer | HFTokenizer:
    """A tokenizer by name or path: ``tok(list[str]) -> LongTensor[B, T]``, plus ``encode`` and ``decode``.

    Args:
        name_or_path: one of

            * ``"clip"`` (also ``"openai"``, ``"openai-clip"``, ``"clip-bpe"``, ``"open_clip"``, None): CLIP's BPE
              with the vocabulary shipped in vlkit;
            * a model preset name (``"clip-b16"``, see ``vlkit info --list``): its ``model.text.tokenizer`` with
              its ``model.text.encoder_seq_length`` as context length;
            * a directory holding Hugging Face ``vocab.json`` + ``merges.txt`` of CLIP (loaded as the exact CLIP
              tokenizer), or a ``tokenizer.json`` (loaded as :class:`HFTokenizer`);
            * a ``tokenizer.json`` file, or a CLIP BPE merges file (``bpe_simple_vocab_16e6.txt.gz``).

            Names are looked up before paths: give ``./clip`` for a directory called ``clip``.
        context_length: positions per row; default 77 for CLIP, the preset's for a preset, and the longest row of
            each batch for a ``tokenizer.json`` tokenizer.

    Returns:
        A :class:`CLIPTokenizer` or :class:`HFTokenizer`.

    Raises:
        FileNotFoundError: the path does not exist (the message names it).
        ValueError: a name that is not known, or a path that holds no tokenizer vlkit can read.
    """
    return _get_tokenizer(name_or_path, context_length, allow_preset=True)


def _get_tokenizer(
    name_or_path: str | os.PathLike | None, context_length: int | None, allow_preset: bool
) -> CLIPTokenizer | HFTokenizer:
    if name_or_path is None or (isinstance(name_or_path, str) and name_or_path.lower() in CLIP_NAMES):
        return CLIPTokenizer.from_bpe_file(context_length=context_length or DEFAULT_CONTEXT_LENGTH)
    path = Path(name_or_path).expanduser()
    if path.exists():
        return _from_path(path, context_length)
    text = str(name_or_path)
    looks_like_path = os.sep in text or "/" in text or text.startswith(".") or text.endswith((".json", ".txt", ".gz"))
    if not looks_like_path and allow_preset:
        from vlkit.config import list_presets, load_config

        presets = list_presets()
        if text in presets:
            text_cfg = load_config(text).model.text
            if text_cfg is None:
                raise ValueError(f"preset {text!r} has no text tower, so it has no tokenizer")
            length = context_length or text_cfg.encoder_seq_length
            return _get_tokenizer(text_cfg.tokenizer, length, allow_preset=False)
        raise ValueError(
            f"unknown tokenizer {text!r}: expected one of {', '.join(CLIP_NAMES)}, a preset ({', '.join(presets)}), "
            "or a path to a tokenizer.json, a directory with tokenizer.json or vocab.json + merges.txt, "
            "or a CLIP BPE .txt.gz file"
        )
    raise FileNotFoundError(f"tokenizer path does not exist: {path}")
