"""The judge-free answer matcher (`eval.parser=match`): where BLINK's fixed rule does not decide, BLINK asks a
GPT-3.5 judge which choice an output "is most similar to"; this module decides those outputs deterministically
from the row's own choices, so that accuracy approximates BLINK's published (judged) numbers offline.

After BLINK's rule (applied by the caller first), in this order, each step deciding only when it finds exactly
one choice (in the whole output, else in its last paragraph):
1. the output cleaned: leading/trailing special tokens ("<|im_start|>", "<s>", "</s>") dropped, NFKC-normalised
   (full-width "（C）" -> "(C)"), markdown "*" and "#" dropped, stripped; a bare letter "C", "(C)", "C." or "C)";
2. a letter at the start: "C. …", "C) …", "(C) …", "C: …";
3. an answer statement: "The answer is C", "Answer: (C)", "the correct option is B";
4. "(C)" anywhere (also "**(C)**", "(C),");
5. the choice texts themselves, case- and punctuation-insensitive, as whole words ("the second image",
   "B is darker", "About the same", "Point C"); a longer choice text is matched before a shorter one it
   contains and hides it ("very dark" vs "dark"); two different choices found: None;
6. a letter named by a choice word: "Point C", "Box B", "Option C", "Choice C", "Picture C", "Image C" (after
   the texts: in "A is closer than point B" the choice text "A is closer" decides).
"Found" is per scope (`scopes`): the whole output, else its first sentence, else its last paragraph. Letters
outside the row's choices never count. Measured against BLINK's judge: bench/blink_scorer.py."""

from __future__ import annotations

import re
import unicodedata

SPECIAL = re.compile(r"^(?:\s*(?:<\|[^|<>]{1,40}\|>|</?s>|<(?:bos|eos|pad|unk)>))+|(?:(?:<\|[^|<>]{1,40}\|>|</?s>|"
                     r"<(?:bos|eos|pad|unk)>)\s*)+$")
_BARE = re.compile(r"\(?([A-Z])\)?[.):]?")
_START = re.compile(r"\(?([A-Z])(?:\)|[.:](?=\s|$)|\n)")
_STATED = re.compile(r"\b(?:answer|option|choice)\s*(?:is|would be|should be|=|:)\s*(?:option\s+|choice\s+)?"
                     r"\(?([A-Z])\)?(?![\w'])", re.IGNORECASE)
_PAREN = re.compile(r"\(([A-Z])\)")
_NAMED = re.compile(r"\b(?:point|box|option|choice|picture|image)\s+\(?([A-Z])\)?(?![\w'])", re.IGNORECASE)


def clean(output: str) -> str:
    """The output without special tokens, NFKC-normalised (full-width brackets and letters to ASCII), without
    markdown emphasis, stripped."""
    text = unicodedata.normalize("NFKC", output)
    text = SPECIAL.sub("", text)
    return re.sub(r"[*#]+", "", text).strip()


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^0-9a-z]+", " ", text.lower()).split())


def _one(found: list[str], valid: set[str]) -> str | None:
    found_set = {f for f in found if f in valid}
    return found_set.pop() if len(found_set) == 1 else None


def scopes(text: str) -> list[str]:
    """Where a unique answer is looked for, in order: the whole output, its first sentence (an answer stated
    first, then discussed), its last paragraph (a conclusion)."""
    first = next((p for p in re.split(r"(?<=[.!?])\s+|\n+", text) if p.strip()), "")
    return [text, first, text.split("\n\n")[-1]]


def _letters(pattern: re.Pattern, text: str, valid: set[str]) -> str | None:
    """The one valid letter `pattern` finds in the first scope that has exactly one. A case-insensitive
    pattern still needs an upper-case letter: "point a" is not "Point A"."""
    for part in scopes(text):
        letter = _one([m.group(1) for m in pattern.finditer(part) if m.group(1).isupper()], valid)
        if letter is not None:
            return letter
    return None


def match_text(text: str, choices: list[str], letters: list[str]) -> str | None:
    """The one choice whose text occurs (whole words, case/punctuation-insensitive) in `text`; a longer choice
    text is matched first and hides the shorter ones inside it; None when none or several are found."""
    norm = f" {_norm(text)} "
    texts = sorted(((f" {_norm(c)} ", l) for c, l in zip(choices, letters) if _norm(c)), key=lambda t: -len(t[0]))
    found = set()
    for t, letter in texts:
        if t in norm:
            found.add(letter)
            norm = norm.replace(t, " \0 ")  # the longer text hides what it contains
    return found.pop() if len(found) == 1 else None


def parse_match(output: str, letters: list[str], choices: list[str] | None = None) -> str | None:
    """Steps 1-6 of the module's doc (BLINK's rule is the caller's): the choice letter, or None."""
    valid = set(letters)
    text = clean(output)
    if not text:
        return None
    m = _BARE.fullmatch(text)
    if m and m.group(1) in valid:
        return m.group(1)
    m = _START.match(text)
    if m and m.group(1) in valid:
        return m.group(1)
    for pattern in (_STATED, _PAREN):
        letter = _letters(pattern, text, valid)
        if letter is not None:
            return letter
    for part in scopes(text) if choices else ():
        letter = match_text(part, list(choices), letters)
        if letter is not None:
            return letter
    return _letters(_NAMED, text, valid)
