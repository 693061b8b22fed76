"""CLIP tokenizer: the same ids as open_clip's SimpleTokenizer on a varied corpus; HF tokenizer files; errors."""

from __future__ import annotations

import hashlib
import json
import pickle
import random
import string

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlkit.data.tokenizer import (
    CLIP_BPE_PATH,
    CLIPTokenizer,
    HFTokenizer,
    clean_text,
    cleaning_path,
    get_tokenizer,
)

open_clip_tokenizer = pytest.importorskip("open_clip.tokenizer")
SOT, EOT = 49406, 49407
OPENAI_BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"

# ---------------------------------------------------------------------------------------------------------------------
# The parity corpus: deterministic, >= 10 000 strings, every kind of text the brief names.
# ---------------------------------------------------------------------------------------------------------------------
_WORDS = (
    "a", "photo", "of", "the", "dog", "cat", "man", "woman", "sitting", "on", "bench", "in", "park", "with", "two",
    "people", "riding", "bicycles", "down", "street", "near", "building", "at", "sunset", "beautiful", "view",
    "mountains", "lake", "portrait", "painting", "drawing", "close-up", "blurry", "bright", "dark", "good", "bad",
    "it's", "don't", "we're", "they've", "i'm", "you'll", "he'd", "rock'n'roll", "o'clock",
)  # fmt: skip
_UNICODE_WORDS = (
    "café", "crème brûlée", "naïve", "résumé", "São Paulo", "Straße", "Ærøskøbing", "Kraków", "Ελληνικά", "Москва",
    "東京", "北京的秋天", "ラーメン", "서울", "ภาษาไทย", "हिन्दी", "العربية", "مرحبا بالعالم", "שלום עולם",
    "\u200fשלום\u200e", "İstanbul", "ß", "ſtraße", "\u212a", "\u212b", "ﬁne ﬂower", "ＬＯＵＤ　ＮＯＩＳＥ", "ｶﾀｶﾅ",
    "e\u0301", "n\u0303o", "\u0301", "①②③", "Ⅻ", "٣٤٥", "१२३", "𝐀𝐁𝐂", "x²", "½", "‰", "©®™", "°C", "€£¥",
    "“quoted”", "‘single’", "it’s", "—", "–", "…", "•", "\xa0", "\u2009", "\u3000", "\u200b", "\u2060",
)  # fmt: skip
_EMOJI = (
    "😀", "🎉", "👍🏽", "👨\u200d👩\u200d👧\u200d👦", "🇫🇷", "🇯🇵", "1️⃣", "❤️", "☀", "🏳️\u200d🌈", "🐕", "🧑🏿\u200d🚀",
    "\U0001f600\U0001f601", "🀄", "\ufe0f",
)  # fmt: skip
_ENTITIES = (
    "&amp;", "&lt;", "&gt;", "&quot;", "&#39;", "&#x27;", "&nbsp;", "&eacute;", "&EACUTE;", "&amp;amp;", "&amp;lt;",
    "&copy;", "&hellip;", "&mdash;", "&#8217;", "&#128512;", "&notanentity;", "&amp", "&", "&#;", "&#xZZ;",
    "&lt;b&gt;bold&lt;/b&gt;", "&#0;", "&#x110000;", "&#55296;", "&#128;", "&#150;", "&frac12;", "&Jscr;", "&ntilde;",
    "&NTILDE;", "&amp;#39;", "&amp;amp;amp;", "AT&T", "R&D", "&&&",
)  # fmt: skip
_CONTROLS = (
    *(chr(c) for c in range(0x20)), "\x7f", *(chr(c) for c in range(0x80, 0xA0)), "\x1b[31m", "\x1b[0m", "\u200e",
    "\u202e", "\u2028", "\u2029", "\ufeff", "\ufffc", "\ufff9", "\u206a", "\ud83d", "\udc00", "\ud83d\ude00", "\r\n",
)  # fmt: skip
_SPECIALS = (
    "<start_of_text>", "<end_of_text>", "<START_OF_TEXT>", "x<end_of_text>y", "<<end_of_text>>", "<|startoftext|>",
    "<|endoftext|>", "<ſtart_of_text>", "<start_of_text", "end_of_text>", "'ſ", "'S", "'LL", "''s", "'''",
)  # fmt: skip
_WHITESPACE = ("", " ", "\t", "\n\n", "\u3000", "\xa0", "\u2003", "\r\n", " \x0b\x0c ", "\x1c\x1d\x1e\x1f", "\x85")


def _mojibake(rng: random.Random) -> str:
    import ftfy.bad_codecs  # noqa: F401  (registers sloppy-windows-1252)

    text = " ".join(rng.choice(_UNICODE_WORDS + _EMOJI) for _ in range(rng.randint(1, 4)))
    codec = rng.choice(("latin-1", "sloppy-windows-1252", "cp1251", "mac_roman", "cp437"))
    broken = text.encode("utf-8").decode(codec, errors="replace")
    if rng.random() < 0.3:  # twice
        broken = broken.encode("utf-8").decode(codec, errors="replace")
    if rng.random() < 0.3:  # mixed with correct text
        broken = f"{rng.choice(_UNICODE_WORDS)} {broken} {rng.choice(_WORDS)}"
    return broken


def _number(rng: random.Random) -> str:
    kind = rng.randrange(8)
    return (
        str(rng.randint(0, 10 ** rng.randint(1, 12))),
        f"{rng.uniform(-1e4, 1e4):.{rng.randint(0, 6)}f}",
        f"{rng.randint(1, 999)},{rng.randint(0, 999):03d},{rng.randint(0, 999):03d}",
        f"${rng.randint(1, 999)}.{rng.randint(0, 99):02d}",
        f"{rng.randint(0, 100)}%",
        f"{rng.choice((19, 20))}{rng.randint(0, 9)}0s",
        f"+1 ({rng.randint(100, 999)}) {rng.randint(100, 999)}-{rng.randint(1000, 9999)}",
        f"{rng.randint(1, 12)}:{rng.randint(0, 59):02d}{rng.choice(('am', 'pm', 'AM', ''))}",
    )[kind]


def _punctuation(rng: random.Random) -> str:
    return "".join(rng.choice(string.punctuation) for _ in range(rng.randint(1, 30)))


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n))


def _long(rng: random.Random) -> str:
    kind = rng.randrange(5)
    if kind == 0:
        return _words(rng, rng.randint(80, 400))
    if kind == 1:  # one very long word
        return "".join(rng.choice(string.ascii_letters) for _ in range(rng.randint(100, 300)))
    if kind == 2:
        return "".join(rng.choice(string.digits) for _ in range(rng.randint(80, 200)))
    if kind == 3:
        return " ".join(rng.choice(_UNICODE_WORDS + _EMOJI + _ENTITIES) for _ in range(rng.randint(40, 120)))
    return _punctuation(rng) * rng.randint(3, 8)


def _random_chars(rng: random.Random) -> str:
    pools = ((0x20, 0x7F), (0xA0, 0x250), (0x370, 0x530), (0x600, 0x700), (0x3040, 0x3100), (0x4E00, 0x4F00),
             (0xAC00, 0xAD00), (0x1F300, 0x1FA00), (0xE000, 0xE100), (0xFF00, 0xFFF0), (0x2000, 0x2070))  # fmt: skip
    lo, hi = rng.choice(pools)
    return "".join(chr(rng.randrange(lo, hi)) if rng.random() < 0.85 else " " for _ in range(rng.randint(1, 40)))


def _fragment(rng: random.Random) -> str:
    kind = rng.randrange(12)
    if kind <= 1:
        text = _words(rng, rng.randint(1, 20))
        return text.upper() if rng.random() < 0.1 else text.capitalize() if rng.random() < 0.5 else text
    if kind == 2:
        return " ".join(rng.choice(_UNICODE_WORDS) for _ in range(rng.randint(1, 6)))
    if kind == 3:
        return "".join(rng.choice(_EMOJI) + rng.choice(("", " ", "x")) for _ in range(rng.randint(1, 5)))
    if kind == 4:
        return f"{_words(rng, rng.randint(0, 3))}{rng.choice(_ENTITIES)}{_words(rng, rng.randint(0, 3))}"
    if kind == 5:
        return _mojibake(rng)
    if kind == 6:
        return _number(rng)
    if kind == 7:
        return _punctuation(rng)
    if kind == 8:
        return f"{_words(rng, rng.randint(0, 3))}{rng.choice(_CONTROLS)}{_words(rng, rng.randint(0, 3))}"
    if kind == 9:
        return rng.choice(_SPECIALS)
    if kind == 10:
        return rng.choice(_WHITESPACE)
    return _random_chars(rng)


def build_corpus(n: int = 12_000, seed: int = 20240611) -> list[str]:
    """Deterministic corpus: every listed edge case, then random mixes of 1-4 fragments of every kind."""
    rng = random.Random(seed)
    fixed = [*_UNICODE_WORDS, *_EMOJI, *_ENTITIES, *_CONTROLS, *_SPECIALS, *_WHITESPACE]
    fixed += ["a" * 300, "&amp;" * 100, "\u00e9" * 200, "<" * 50 + "a", "'s" * 50]
    out = list(fixed)
    separators = (" ", "", "  ", "\n", "\t", " \r\n ", "\xa0", ", ")
    while len(out) < n:
        if rng.random() < 0.04:
            out.append(_long(rng))
            continue
        parts = [_fragment(rng) for _ in range(rng.choice((1, 1, 2, 3, 4)))]
        text = parts[0]
        for part in parts[1:]:
            text += rng.choice(separators) + part
        out.append(text)
    return out


@pytest.fixture(scope="module")
def ref():
    return open_clip_tokenizer.SimpleTokenizer()


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer("clip")


@pytest.fixture(scope="module")
def corpus():
    return build_corpus()


@pytest.fixture(scope="module")
def ref_encoded(corpus):
    """open_clip's cleaned text and ids of every corpus string (its cleaning recorded on the way: ftfy is slow)."""
    ref, cleaned = open_clip_tokenizer.SimpleTokenizer(), []
    clean = ref.clean_fn

    def recording_clean(text):
        cleaned.append(clean(text))
        return cleaned[-1]

    ref.clean_fn = recording_clean
    ids = [ref.encode(text) for text in corpus]
    assert len(cleaned) == len(corpus)
    return cleaned, ids


@pytest.fixture(scope="module")
def ref_ids(ref_encoded):
    return ref_encoded[1]


# ---------------------------------------------------------------------------------------------------------------------
# Vocabulary and parity
# ---------------------------------------------------------------------------------------------------------------------
def test_shipped_vocabulary_is_openai_file_and_vocab(tok, ref):
    assert hashlib.sha256(CLIP_BPE_PATH.read_bytes()).hexdigest() == OPENAI_BPE_SHA256
    assert (CLIP_BPE_PATH.parent / "LICENSE-CLIP-BPE.txt").is_file()
    assert tok.vocab == ref.encoder
    assert tok.vocab_size == 49408
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (SOT, EOT, 0)
    assert (tok.sot_token_id, tok.eot_token_id) == (SOT, EOT)


def test_corpus_is_large_and_covers_every_cleaning_path(corpus):
    assert len(corpus) >= 10_000
    assert len(set(corpus)) > 9_000
    paths = [cleaning_path(text) for text in corpus]
    for path in ("ascii", "unicode", "ftfy"):
        assert paths.count(path) > 500, path


def test_clean_text_equals_open_clip_on_corpus(corpus, ref_encoded):
    mismatches = [t for t, cleaned in zip(corpus, ref_encoded[0]) if clean_text(t) != cleaned]
    assert mismatches == []


def test_batch_equals_open_clip_on_corpus(tok, corpus, ref, ref_ids):
    ours = tok(corpus)
    assert ours.dtype == torch.long and ours.shape == (len(corpus), 77)
    # Every row against open_clip's ids, then open_clip's own batching on every long text and a sample.
    mismatches = []
    for k, (row, ids) in enumerate(zip(ours.tolist(), ref_ids)):
        ids = [SOT, *ids[:75], EOT]
        if row != ids + [0] * (77 - len(ids)):
            mismatches.append(corpus[k])
    assert mismatches == [], f"{len(mismatches)} of {len(corpus)} differ, first: {mismatches[:3]}"
    long_rows = [k for k, ids in enumerate(ref_ids) if len(ids) > 75]
    assert len(long_rows) > 200  # truncation is exercised
    assert (ours[long_rows, -1] == EOT).all()
    rows = sorted({*long_rows, *random.Random(0).sample(range(len(corpus)), 1000)})
    assert torch.equal(ours[rows], ref([corpus[k] for k in rows]))


def test_encode_equals_open_clip_beyond_the_context(tok, corpus, ref_ids):
    # Rows above hold whole id lists up to 75 tokens; encode() must also match on longer texts, untruncated.
    long_texts = [(t, ids) for t, ids in zip(corpus, ref_ids) if len(ids) > 75]
    assert all(tok.encode(t) == ids for t, ids in long_texts)


@pytest.mark.parametrize("length", [2, 3, 16, 200])
def test_other_context_lengths_equal_open_clip(tok, ref, corpus, length):
    texts = corpus[:300] + [_words(random.Random(length), 300)]
    assert torch.equal(tok(texts, context_length=length), ref(texts, context_length=length))


def test_fresh_tokenizer_and_tiny_cache_give_the_same_ids(corpus, ref):
    # Cold caches, a cache emptied every few entries, and repeated calls must not change any id.
    tiny = CLIPTokenizer.from_bpe_file()
    tiny.cache_size = 8
    texts = corpus[:800]
    expected = ref(texts)
    assert torch.equal(tiny(texts), expected)
    assert torch.equal(tiny(texts), expected)


_settings = settings(max_examples=300, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))


@_settings
@given(st.text())
def test_arbitrary_text_equals_open_clip(tok, ref, text):
    assert tok.encode(text) == ref.encode(text)


@_settings
@given(st.text(alphabet=st.characters(max_codepoint=0x7F), max_size=80))
def test_arbitrary_ascii_equals_open_clip(tok, ref, text):
    assert tok.encode(text) == ref.encode(text)
    assert clean_text(text) == open_clip_tokenizer._clean_lower(text)


def test_empty_and_whitespace_rows(tok):
    rows = tok(["", " ", "\t\n", "\u3000", "\xa0 \u2003"])
    expected = torch.zeros(5, 77, dtype=torch.long)
    expected[:, 0], expected[:, 1] = SOT, EOT
    assert torch.equal(rows, expected)


def test_single_string_and_empty_batch(tok, ref):
    assert torch.equal(tok("a photo of a dog"), ref("a photo of a dog"))
    assert tok([]).shape == (0, 77)
    with pytest.raises(ValueError, match="context_length"):
        tok(["x"], context_length=1)


def test_special_token_text_maps_to_special_ids(tok):
    assert tok.encode("<start_of_text>") == [SOT]
    assert tok.encode("x <END_OF_TEXT>") == [tok.encode("x")[0], EOT]


# ---------------------------------------------------------------------------------------------------------------------
# decode
# ---------------------------------------------------------------------------------------------------------------------
def test_decode_round_trip_ascii_words(tok):
    rng = random.Random(0)
    for _ in range(300):
        text = " ".join("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(1, 12)))
                        for _ in range(rng.randint(1, 15)))  # fmt: skip
        assert tok.decode(tok.encode(text)) == text
        assert tok.decode(tok([text])[0]) == text  # a padded row: specials and padding dropped


def test_decode_then_encode_is_stable_on_printable_ascii(tok):
    rng = random.Random(1)
    for _ in range(500):
        text = "".join(rng.choice(string.printable) for _ in range(rng.randint(0, 60)))
        ids = tok.encode(text)
        assert tok.encode(tok.decode(ids)) == ids, text


def test_decode_unicode_and_specials(tok, ref):
    text = "Café 東京 😀 it's"
    assert tok.decode(tok.encode(text)) == ref.decode(ref.encode(text)).strip() == "café 東京 😀 it 's"
    assert tok.decode([SOT, *tok.encode("a dog"), EOT], skip_special_tokens=False) == (
        "<start_of_text>a dog <end_of_text>"
    )
    with pytest.raises(ValueError, match="1-D"):
        tok.decode(tok(["a", "b"]))


def test_pickle_round_trip(tok, corpus):
    clone = pickle.loads(pickle.dumps(tok))
    assert torch.equal(clone(corpus[:500]), tok(corpus[:500]))


# ---------------------------------------------------------------------------------------------------------------------
# get_tokenizer: names, presets, Hugging Face files, errors
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["clip", "openai", "CLIP", None, "clip-b16", "clip-tiny"])
def test_clip_names_and_presets(name):
    t = get_tokenizer(name)
    assert isinstance(t, CLIPTokenizer) and t.context_length == 77
    assert get_tokenizer(name, context_length=32)(["a dog"]).shape == (1, 32)


def _write_hf_clip_files(directory, tok):
    renamed = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {renamed.get(token, token): i for token, i in tok.vocab.items()}
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges = "".join(f"{a} {b}\n" for a, b in tok.merges)
    (directory / "merges.txt").write_text("#version: 0.2\n" + merges, encoding="utf-8")


def test_vocab_json_merges_txt_directory(tmp_path, tok, corpus):
    _write_hf_clip_files(tmp_path, tok)
    hf_files = get_tokenizer(tmp_path)
    assert isinstance(hf_files, CLIPTokenizer)
    assert isinstance(get_tokenizer(tmp_path / "vocab.json"), CLIPTokenizer)
    assert (hf_files.bos_token_id, hf_files.eos_token_id) == (SOT, EOT)
    # The special tokens are spelled differently, so texts spelling either are left out.
    texts = [t for t in corpus[:1500] if "of_text" not in t.lower() and "oftext" not in t.lower()]
    assert torch.equal(hf_files(texts), tok(texts))
    assert hf_files.encode("<|endoftext|>") == [EOT]


def _plain_strings(n: int) -> list[str]:
    """Strings on which HF's CLIPTokenizer (no ftfy, no HTML unescaping) and OpenAI's cleaning agree."""
    rng = random.Random(7)
    accented = ("café", "naïve", "São", "straße", "москва", "東京", "ελληνικά", "señor")
    out = []
    for _ in range(n):
        words = [rng.choice((*_WORDS, *accented)) for _ in range(rng.randint(1, 12))]
        words.insert(rng.randrange(len(words) + 1), _number(rng) if rng.random() < 0.5 else "!?")
        text = " ".join(words)
        out.append(text.capitalize() if rng.random() < 0.5 else text)
    return out


def test_vocab_merges_agree_with_transformers_clip_tokenizer(tmp_path, tok):
    transformers = pytest.importorskip("transformers")
    _write_hf_clip_files(tmp_path, tok)
    ours = get_tokenizer(tmp_path)
    hf = transformers.CLIPTokenizer(vocab=str(tmp_path / "vocab.json"), merges=str(tmp_path / "merges.txt"))
    texts = _plain_strings(300)
    for text in texts:
        expected = hf(text)["input_ids"]
        assert [SOT, *ours.encode(text), EOT] == expected, text
        assert [SOT, *tok.encode(text), EOT] == expected, text


def _train_tiny_hf_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    hf = Tokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<unk>", "<s>", "</s>"])
    rng = random.Random(3)
    hf.train_from_iterator((_words(rng, 12) for _ in range(500)), trainer=trainer)
    bos, eos = hf.token_to_id("<s>"), hf.token_to_id("</s>")
    hf.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", bos), ("</s>", eos)]
    )
    hf.enable_padding(pad_id=hf.token_to_id("<pad>"), pad_token="<pad>")  # switched off by the wrapper
    hf.save(str(path))
    return Tokenizer.from_file(str(path))


def test_hf_tokenizer_json_file_and_directory(tmp_path):
    reference = _train_tiny_hf_tokenizer(tmp_path / "tokenizer.json")
    texts = ["a photo of the dog", "two people riding bicycles down the street near a building at sunset", ""]
    for source in (tmp_path / "tokenizer.json", tmp_path, str(tmp_path)):
        t = get_tokenizer(source)
        assert isinstance(t, HFTokenizer)
        assert t.pad_token_id == reference.token_to_id("<pad>")
        assert (t.bos_token_id, t.eos_token_id) == (reference.token_to_id("<s>"), reference.token_to_id("</s>"))
        assert t.vocab_size == reference.get_vocab_size()
        rows = t(texts)
        expected = [reference.encode(x).ids for x in texts]
        longest = max(map(len, expected))
        assert rows.dtype == torch.long and rows.shape == (3, longest)
        for row, ids in zip(rows.tolist(), expected):
            assert row == ids + [t.pad_token_id] * (longest - len(ids))
        assert t.encode(texts[0]) == reference.encode(texts[0], add_special_tokens=False).ids
        assert t.decode(rows[0]) == reference.decode(expected[0])
        cut = t(texts, context_length=5)
        assert cut.shape == (3, 5) and cut[1, -1] == t.eos_token_id and cut[1, 0] == t.bos_token_id


def test_hf_tokenizer_config_names_special_tokens(tmp_path):
    reference = _train_tiny_hf_tokenizer(tmp_path / "tokenizer.json")
    config = {"pad_token": "<unk>", "eos_token": {"content": "</s>"}, "bos_token": "<s>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    t = get_tokenizer(tmp_path, context_length=40)
    assert t.pad_token_id == reference.token_to_id("<unk>")
    assert t(["a dog"]).shape == (1, 40)


def test_clip_files_win_over_tokenizer_json(tmp_path, tok):
    _write_hf_clip_files(tmp_path, tok)
    _train_tiny_hf_tokenizer(tmp_path / "tokenizer.json")
    assert isinstance(get_tokenizer(tmp_path), CLIPTokenizer)


def test_bpe_file_path(tok):
    t = get_tokenizer(CLIP_BPE_PATH)
    assert isinstance(t, CLIPTokenizer) and t.vocab == tok.vocab


def test_errors_name_the_problem(tmp_path):
    missing = tmp_path / "no" / "such" / "tokenizer.json"
    with pytest.raises(FileNotFoundError, match=str(missing).replace("\\", "\\\\")):
        get_tokenizer(missing)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        get_tokenizer("./not-here")
    with pytest.raises(ValueError, match="unknown tokenizer 'bert'"):
        get_tokenizer("bert")
    with pytest.raises(ValueError, match=f"{tmp_path}: no tokenizer.json"):
        get_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="no text tower"):
        get_tokenizer("vit-tiny")
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(ValueError, match="weights.bin: unknown tokenizer file"):
        get_tokenizer(tmp_path / "weights.bin")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="bad.json: not a Hugging Face tokenizer.json"):
        get_tokenizer(tmp_path / "bad.json")
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "vocab.json").write_text(json.dumps({"a": 0, "b": 1, "ab": 2}))
    (gpt2 / "merges.txt").write_text("#version: 0.2\na b\n")
    with pytest.raises(ValueError, match="not CLIP's"):
        get_tokenizer(gpt2)
