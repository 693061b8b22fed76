"""VQAv2's answer normalisation and its 10-annotator accuracy, as the official evaluation (``vqaEval.py``) defines
them, and the answer processor LLaVA applies before a test-dev submission.

:func:`normalize_vqa_answer` (the official rules, used for scoring):

1. newlines and tabs to spaces, surrounding whitespace stripped;
2. each mark of :data:`OFFICIAL_PUNCTUATION` is deleted when it touches a space (``"red, white"`` -> ``"red white"``)
   or the answer holds a digit-comma-digit (``"2,000"`` -> ``"2000"``), else replaced by a space (``"red/white"``
   -> ``"red white"``, ``"don't"`` -> ``"don t"``); ``-`` and ``!`` are not in the list;
3. a period not followed by a digit is deleted (``"cat."`` -> ``"cat"``, ``"3.5"`` kept);
4. lowercase; per word: number words zero..ten and ``none`` to digits (word by word: ``"twenty two"`` ->
   ``"twenty 2"``), articles a/an/the dropped, missing apostrophes restored from the contractions table (``"dont"``
   -> ``"don't"``).

:func:`evalai_answer` is the EvalAI processor of LLaVA's ``convert_vqav2_for_submission.py``: lowercase, commas and
question marks dropped, ``'s`` split off, then steps 2-4 with :data:`EVALAI_PUNCTUATION` (which has ``-`` and ``!``
but not ``'`` and ``:``).

The official table writes most restored apostrophes as ``’``; ours writes ``'`` throughout (as EvalAI's copy does).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6", "seven": "7",
    "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = frozenset({"a", "an", "the"})
OFFICIAL_PUNCTUATION = tuple(";:/'[]\"()=+\\_><@`,?")
EVALAI_PUNCTUATION = tuple(';/[]"{}()=+\\_-><@`,?!')

# Words written without their apostrophe -> the contraction (the evaluation's table; identity rows left out).
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't",
    "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's",
    "somethingd": "something'd", "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd", "thered've": "there'd've",
    "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've",
    "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd",
    "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've",
    "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}  # fmt: skip

_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")


def process_punctuation(text: str, marks: Sequence[str] = OFFICIAL_PUNCTUATION) -> str:
    """Steps 2 and 3 of the module docstring."""
    # Whether a mark touches a space is judged on the text as it came in, not as already edited (as vqaEval does).
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for p in marks:
        out = out.replace(p, "" if delete_all or (p + " " in text or " " + p in text) else " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def process_digits_articles(text: str) -> str:
    """Step 4 of the module docstring."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_vqa_answer(text: str) -> str:
    """A predicted answer as VQAv2's official evaluation compares it: ``"The Cat."`` -> ``"cat"``, ``"Two"`` ->
    ``"2"``, ``"dont"`` -> ``"don't"``, ``"2,000"`` -> ``"2000"``."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digits_articles(process_punctuation(text))


def evalai_answer(text: str) -> str:
    """An answer as LLaVA writes it into the test-dev submission (EvalAI's processor, module docstring)."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digits_articles(process_punctuation(text, EVALAI_PUNCTUATION))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA's accuracy of one answer against the humans' answers: for each human answer, ``min(1, #other humans who
    gave the prediction / 3)``, averaged over the humans (the official "averaged over all 10 choose 9 subsets").

    With VQAv2's 10 answers, a prediction that k humans gave scores 0.3, 0.6, 0.9 for k = 1, 2, 3 and 1 from k = 4.
    The prediction is normalised (:func:`normalize_vqa_answer`); the humans' answers, as officially, only by
    punctuation and only when they disagree. With one reference the score is the exact match (leaving the only
    human out would leave nothing to match).
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    pred = normalize_vqa_answer(prediction)
    refs = [process_punctuation(a) for a in answers] if len(set(answers)) > 1 else list(answers)
    return annotator_average(sum(r == pred for r in refs), len(refs))


def annotator_average(k: int, n: int) -> float:
    """VQA's accuracy when ``k`` of ``n`` human answers equal the prediction: ``min(1, matches among the other
    n - 1 / 3)`` averaged over the humans; the exact match when there is one answer."""
    if n == 1:
        return float(k)
    # A human who gave the prediction sees k - 1 matches among the others; one who did not sees k.
    return (k * min(1.0, (k - 1) / 3) + (n - k) * min(1.0, k / 3)) / n
