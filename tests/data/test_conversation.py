"""Conversation templates: exact token strings and label masks per template, the image sentinel, generation prompts,
the tokenization-mismatch counter, special-token checks and truncation after splicing."""

from __future__ import annotations

import logging
import re

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from vlkit.config.validate import CONV_TEMPLATES
from vlkit.data.conversation import (
    ALL_SPECIAL_TOKENS,
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    NVGPT_LABEL,
    TEMPLATES,
    ConversationTokenizer,
    Tokenized,
    Turn,
    fit_to_context,
    get_template,
    turns_from_json,
)
from vlkit.data.tokenizer import HFTokenizer

SYSTEM = "Be brief."
TURNS = [
    Turn("human", "<image>\nWhat colour is the shape?"),
    Turn("gpt", "red", label="quality:4"),
    Turn("human", "What shape is it?"),
    Turn("gpt", "circle", label="quality:4"),
]
_SPECIALS = re.compile("(" + "|".join(re.escape(s) for s in ALL_SPECIAL_TOKENS) + ")")


def word_tokenizer(texts: list[str], specials: tuple[str, ...] = ALL_SPECIAL_TOKENS) -> HFTokenizer:
    """A WordLevel tokenizer over GPT-2's byte-level words: every token is one pre-tokenized word, so the expected
    token strings below can be written by hand."""
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False)
    vocab = {t: i for i, t in enumerate(specials)}
    split = re.compile("(" + "|".join(re.escape(s) for s in specials) + ")")
    for text in texts:
        for part in split.split(text):
            if part and part not in specials:
                for word, _ in pre.pre_tokenize_str(part):
                    vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(specials))
    return HFTokenizer(tok)


def rendered_corpus(turns=TURNS, system=SYSTEM) -> list[str]:
    out = []
    for template in TEMPLATES.values():
        out.append("".join(s.text for s in template.segments(turns[:2] if template.plain else turns, system=system)))
    return out + ["<s>"]


@pytest.fixture(scope="module")
def tok() -> HFTokenizer:
    return word_tokenizer(rendered_corpus())


def tokens_and_mask(tok: HFTokenizer, out: Tokenized) -> list[str]:
    """Token strings, supervised ones prefixed with '+', the image sentinel as '<IMG>'."""
    strings = ["<IMG>" if i == IMAGE_TOKEN_INDEX else tok.tokenizer.id_to_token(i) for i in out.input_ids]
    for label, token_id in zip(out.labels, out.input_ids):
        assert label in (IGNORE_INDEX, token_id)  # labels are unshifted copies of the supervised ids
    return [("+" if label != IGNORE_INDEX else "") + s for s, label in zip(strings, out.labels)]


# The label line of NVGPT as the word tokenizer splits it ("quality:4" given in the turns).
_Q = ["quality", ":", "4", "Ċ"]
EXPECTED = {
    # [BOS] <image> caption \n: the human text is replaced by the image alone, the caption and newline learned.
    "plain": ["<s>", "<IMG>", "+red", "+Ċ"],
    # "<s>Be brief. USER: <image>\nWhat colour is the shape? ASSISTANT: red</s>USER: What shape is it? ASSISTANT:
    # circle</s>"
    "vicuna_v1": [
        "<s>", "Be", "Ġbrief", ".", "ĠUSER", ":", "Ġ", "<IMG>", "Ċ", "What", "Ġcolour", "Ġis", "Ġthe", "Ġshape", "?",
        "ĠASSISTANT", ":", "+Ġred", "+</s>",
        "USER", ":", "ĠWhat", "Ġshape", "Ġis", "Ġit", "?", "ĠASSISTANT", ":", "+Ġcircle", "+</s>",
    ],
    # "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n<image>\nWhat colour is the shape? [/INST] red </s><s>[INST] What
    # shape is it? [/INST] circle </s>"
    "llama_2": [
        "<s>", "[", "INST", "]", "Ġ<<", "SYS", ">>", "Ċ", "Be", "Ġbrief", ".", "Ċ", "<</", "SYS", ">>", "ĊĊ",
        "<IMG>", "Ċ", "What", "Ġcolour", "Ġis", "Ġthe", "Ġshape", "?", "Ġ[/", "INST", "]", "+Ġred", "+Ġ", "+</s>",
        "<s>", "[", "INST", "]", "ĠWhat", "Ġshape", "Ġis", "Ġit", "?", "Ġ[/", "INST", "]", "+Ġcircle", "+Ġ", "+</s>",
    ],
    # "<extra_id_0>System\nBe brief.\n\n<extra_id_1>User\n<image>\nWhat colour is the shape?\n<extra_id_1>Assistant\n
    # <extra_id_2>quality:4\nred\n<extra_id_1>User\nWhat shape is it?\n<extra_id_1>Assistant\n<extra_id_2>quality:4\n
    # circle\n<extra_id_1>"
    "nvgpt": [
        "<extra_id_0>", "System", "Ċ", "Be", "Ġbrief", ".", "ĊĊ",
        "<extra_id_1>", "User", "Ċ", "<IMG>", "Ċ", "What", "Ġcolour", "Ġis", "Ġthe", "Ġshape", "?", "Ċ",
        "<extra_id_1>", "Assistant", "Ċ", "<extra_id_2>", *_Q, "+red", "+Ċ", "+<extra_id_1>",
        "User", "Ċ", "What", "Ġshape", "Ġis", "Ġit", "?", "Ċ",
        "<extra_id_1>", "Assistant", "Ċ", "<extra_id_2>", *_Q, "+circle", "+Ċ", "+<extra_id_1>",
    ],
    # "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user
    # <|end_header_id|>\n\n<image>\nWhat colour is the shape?<|eot_id|><|start_header_id|>assistant<|end_header_id|>
    # \n\nred<|eot_id|> ... circle<|eot_id|>"
    "llama_3": [
        "<|begin_of_text|>", "<|start_header_id|>", "system", "<|end_header_id|>", "Ċ", "Ċ", "Be", "Ġbrief", ".",
        "<|eot_id|>", "<|start_header_id|>", "user", "<|end_header_id|>", "ĊĊ", "<IMG>", "Ċ",
        "What", "Ġcolour", "Ġis", "Ġthe", "Ġshape", "?", "<|eot_id|>",
        "<|start_header_id|>", "assistant", "<|end_header_id|>", "Ċ", "Ċ", "+red", "+<|eot_id|>",
        "<|start_header_id|>", "user", "<|end_header_id|>", "Ċ", "Ċ", "What", "Ġshape", "Ġis", "Ġit", "?", "<|eot_id|>",
        "<|start_header_id|>", "assistant", "<|end_header_id|>", "Ċ", "Ċ", "+circle", "+<|eot_id|>",
    ],
}  # fmt: skip


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_label_mask_per_template(tok, name):
    ct = ConversationTokenizer(tok, name)
    turns = TURNS[:2] if name == "plain" else TURNS
    out = ct(turns, system=SYSTEM, sample_id="s0")
    assert tokens_and_mask(tok, out) == EXPECTED[name]
    assert out.num_images == 1 and not out.mismatch
    assert ct.counts == {"samples": 1}


def test_templates_known_to_the_config_validator():
    assert set(CONV_TEMPLATES) == set(TEMPLATES)
    with pytest.raises(ValueError, match="unknown conversation template 'vicuna'"):
        get_template("vicuna")


def test_default_system_and_nvgpt_label(tok):
    text = ConversationTokenizer(tok, "nvgpt").render([Turn("human", "hi"), Turn("gpt", "yo")])
    assert text.startswith("<extra_id_0>System\nA chat between a curious user and an artificial intelligence")
    assert f"<extra_id_1>Assistant\n<extra_id_2>{NVGPT_LABEL}\nyo\n<extra_id_1>" in text
    # An empty system prompt drops the Llama-2 <<SYS>> block and the Llama-3 system header.
    assert ConversationTokenizer(tok, "llama_2").render(TURNS[:2], system="").startswith("<s>[INST] <image>\n")
    llama3 = ConversationTokenizer(tok, "llama_3").render(TURNS[:2], system="")
    assert llama3.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>")


@pytest.mark.parametrize("name", [n for n in TEMPLATES if n != "plain"])
def test_generation_prompt_is_the_training_prefix(tok, name):
    """What the model reads at inference is exactly what preceded its first answer in training (also where the
    header ends in whitespace that the tokenizer splits by what follows: llama_3's "\n\n")."""
    ct = ConversationTokenizer(tok, name)
    turns = [t._replace(label=None) for t in TURNS]  # NVGPT: the default label line, as at inference
    train = ct(turns, system=SYSTEM)
    sup = [label != IGNORE_INDEX for label in train.labels]
    first, second = [i for i in range(1, len(sup)) if sup[i] and not sup[i - 1]]  # where each answer starts
    assert ct.prompt(turns[:1], system=SYSTEM) == train.input_ids[:first]
    assert ct.prompt(turns[:3], system=SYSTEM) == train.input_ids[:second]
    stop = ct.stop_token_ids
    assert stop and train.input_ids[-1] in stop  # the last supervised token ends the answer
    with pytest.raises(ValueError, match="ends with a human turn"):
        ct.prompt(TURNS[:2])


def test_image_sentinel_placement(tok):
    ct = ConversationTokenizer(tok, "vicuna_v1")
    turns = [Turn("human", "What colour is <image> the shape?"), Turn("gpt", "red")]
    out = ct(turns, system=SYSTEM)
    strings = tokens_and_mask(tok, out)
    assert out.input_ids.count(IMAGE_TOKEN_INDEX) == 1
    image_at = out.input_ids.index(IMAGE_TOKEN_INDEX)
    assert strings[image_at - 3 : image_at + 3] == ["Ġcolour", "Ġis", "Ġ", "<IMG>", "Ġthe", "Ġshape"]
    assert out.labels[image_at] == IGNORE_INDEX
    # Text-only conversation: no sentinel.
    text_only = ct([Turn("human", "What shape is it?"), Turn("gpt", "circle")], system=SYSTEM)
    assert text_only.num_images == 0 and IMAGE_TOKEN_INDEX not in text_only.input_ids


def test_image_placeholder_that_is_not_a_token_becomes_one_sentinel():
    """Real LLaMA tokenizers do not have <image>: its pieces ("<", "image", ">") collapse into one sentinel."""
    no_image = tuple(s for s in ALL_SPECIAL_TOKENS if s != "<image>")
    tok = word_tokenizer(rendered_corpus() + ["x <image> y"], specials=no_image)
    ct = ConversationTokenizer(tok, "vicuna_v1")
    out = ct(TURNS, system=SYSTEM)
    strings = tokens_and_mask(tok, out)
    assert out.num_images == 1 and not out.mismatch
    # " <image>" was "Ġ<", "image", ">": the space went into the image (as consistently at inference).
    assert strings[4:8] == ["ĠUSER", ":", "<IMG>", "Ċ"]
    assert strings == [s for i, s in enumerate(EXPECTED["vicuna_v1"]) if i != 6]  # all else as with <image> a token


def _char_bpe(texts: list[str], merges: list[tuple[str, str]]) -> HFTokenizer:
    """Character BPE without a pre-tokenizer (merges may cross spaces), with the given merges."""
    chars = sorted({c for t in texts for c in _SPECIALS.sub("", t)})
    vocab = {t: i for i, t in enumerate(ALL_SPECIAL_TOKENS)}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>"))
    tok.add_special_tokens(list(ALL_SPECIAL_TOKENS))
    return HFTokenizer(tok)


def test_tokenization_mismatch_is_counted_masked_and_logged(caplog):
    """A token ": r" that swallows the separator and the answer's first letter: the sample is fully masked."""
    red = [Turn("human", "Colour?"), Turn("gpt", "red")]
    blue = [Turn("human", "Colour?"), Turn("gpt", "blue")]
    tok = _char_bpe(rendered_corpus() + ["Colour? ASSISTANT: red blue"], merges=[(":", " "), (": ", "r")])
    ct = ConversationTokenizer(tok, "vicuna_v1")
    with caplog.at_level(logging.WARNING, logger="vlkit.data.conversation"):
        bad = ct(red, system=SYSTEM, sample_id="sample-red")
        good = ct(blue, system=SYSTEM, sample_id="sample-blue")
    assert bad.mismatch and bad.num_supervised == 0 and set(bad.labels) == {IGNORE_INDEX}
    assert not good.mismatch and good.num_supervised == len("blue") + 1  # b, l, u, e, </s>
    assert ct.counts == {"samples": 2, "tokenization_mismatch": 1, "all_masked": 1}
    assert "sample-red" in caplog.text and "tokenization mismatch" in caplog.text
    assert "sample-blue" not in caplog.text


def test_special_tokens_must_be_single_added_tokens():
    missing = word_tokenizer(rendered_corpus(), specials=tuple(s for s in ALL_SPECIAL_TOKENS if s != "<|eot_id|>"))
    with pytest.raises(ValueError, match="needs '<\\|eot_id\\|>'"):
        ConversationTokenizer(missing, "llama_3")
    ConversationTokenizer(missing, "vicuna_v1")  # a template that does not need it is fine
    # "</s>" in the vocabulary as a plain word: glued to text it becomes part of an unknown word.
    plain_word = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3}, unk_token="<unk>"))
    plain_word.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    plain_word.add_special_tokens(["<s>"])
    with pytest.raises(ValueError, match="splits '</s>' when it touches text"):
        ConversationTokenizer(HFTokenizer(plain_word), "vicuna_v1")
    with pytest.raises(TypeError, match="not a Hugging Face tokenizer"):
        ConversationTokenizer(object(), "plain")


def test_fit_to_context_after_splicing():
    ids = [1, IMAGE_TOKEN_INDEX, *range(10, 28)]  # 20 ids, the image at 1
    sample = Tokenized(ids, [IGNORE_INDEX] * 10 + ids[10:], num_images=1)
    # 18 positions per image (16 patches + start/end): 20 + 17 = 37 positions spliced; the context holds 30.
    cut = fit_to_context(sample, max_length=30, image_tokens=18)
    assert cut.truncated and len(cut.input_ids) == 13 and len(cut.input_ids) + 17 == 30
    assert cut.labels == sample.labels[:13] and cut.input_ids == ids[:13]
    assert fit_to_context(sample, max_length=37, image_tokens=18) is sample  # fits exactly: untouched
    assert fit_to_context(sample, max_length=18, image_tokens=18) is None  # the image itself does not fit
    assert fit_to_context(sample, max_length=19, image_tokens=18).input_ids == ids[:2]  # the image just fits
    text_only = Tokenized(list(range(50)), list(range(50)))
    assert fit_to_context(text_only, max_length=30, image_tokens=18).input_ids == list(range(30))


def test_template_checks_and_json_turns():
    vicuna, plain = get_template("vicuna_v1"), get_template("plain")
    assert "alternate" in vicuna.check([Turn("human", "a"), Turn("human", "b")], has_image=False)
    assert "no gpt turn" in vicuna.check([Turn("human", "a")], has_image=False)
    assert "contains <image>" in vicuna.check([Turn("human", "a"), Turn("gpt", "<image>")], has_image=True)
    assert "one exchange" in plain.check(TURNS, has_image=True)
    assert "no image" in plain.check(TURNS[:2], has_image=False)
    assert vicuna.check(TURNS, has_image=True) is None
    turns = turns_from_json([{"from": "user", "value": "q"}, {"from": "assistant", "value": "a", "label": "x"}])
    assert turns == [Turn("human", "q"), Turn("gpt", "a", "x")]
    with pytest.raises(ValueError, match=r"f.json sample 3: conversations\[1\].from is 'bot'"):
        turns_from_json([{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}], "f.json sample 3")
    with pytest.raises(ValueError, match=r"conversations\[0\].value is int"):
        turns_from_json([{"from": "human", "value": 3}])
