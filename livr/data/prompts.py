"""Prompt formatting, training targets and answer parsing (BLINK's official scoring rules)."""

from __future__ import annotations

import re
import string

from livr.data.tasks import DataError

SELECT_LINE = "Select from the following choices."
OPEN_SUFFIX = "Answer with a number."
_PAREN = re.compile(r"\(([A-Z])\)")
_INT = re.compile(r"-?\d+")


def choice_letters(n: int) -> list[str]:
    """The first n choice letters: ["A", "B", ...]."""
    if not 0 <= n <= 26:
        raise DataError(f"number of choices must be in 0..26, got {n}")
    return list(string.ascii_uppercase[:n])


def blink_prompt(question: str, choices: list[str]) -> str:
    """BLINK's prompt: question, the 'Select' line, one '(X) choice' line per choice.
    With no choices (open-ended): question + '\\nAnswer with a number.'"""
    if not choices:
        return f"{question}\n{OPEN_SUFFIX}"
    lines = [f"({l}) {c}" for l, c in zip(choice_letters(len(choices)), choices)]
    return "\n".join([question, SELECT_LINE, *lines])


def format_prompt(row: dict) -> str:
    """The text the model reads after the image(s): the row's `prompt` if set, else built from
    question and choices in BLINK's format."""
    prompt = row.get("prompt") or ""
    if prompt.strip():
        return prompt
    return blink_prompt(row["question"], list(row.get("choices") or []))


def answer_letter(row: dict) -> str | None:
    """The gold letter of a multiple-choice row ("(B)" -> "B"); None for an open-ended row."""
    if not row.get("choices"):
        return None
    m = re.fullmatch(r"\(?([A-Z])\)?", (row.get("answer") or "").strip())
    if not m or m.group(1) not in choice_letters(len(row["choices"])):
        raise DataError(f"idx={row.get('idx')}: answer {row.get('answer')!r} is not a choice letter "
                        f"among {len(row['choices'])} choices")
    return m.group(1)


def target_text(row: dict, answer_format: str = "letter") -> str:
    """What the model is trained to output: "B" (letter) or "(B)" (paren); open-ended: the number."""
    if answer_format not in ("letter", "paren"):
        raise DataError(f"answer_format must be 'letter' or 'paren', got {answer_format!r}")
    letter = answer_letter(row)
    if letter is None:
        return str(row["answer"]).strip()
    return letter if answer_format == "letter" else f"({letter})"


def _unique(text: str, valid: set[str]) -> set[str]:
    return {m for m in _PAREN.findall(text) if m in valid}


def parse_answer(output: str, num_choices: int) -> str | None:
    """BLINK's rules: the whole output (stripped) is "A" or "(A)"; else a unique "(X)" among the
    valid choices in the output, or else in its last paragraph. Case-sensitive, as BLINK's.
    Returns the letter or None (no, several, or out-of-range letters)."""
    if not output:
        return None
    valid = set(choice_letters(num_choices))
    text = output.strip()
    m = re.fullmatch(r"\(?([A-Z])\)?", text)
    if m and (text == m.group(1) or text == f"({m.group(1)})"):
        return m.group(1) if m.group(1) in valid else None
    found = _unique(text, valid)
    last = _unique(text.split("\n\n")[-1], valid)
    if len(found) == 1:
        return found.pop()
    if len(last) == 1:
        return last.pop()
    return None


def is_correct(output: str, row: dict) -> bool:
    """MC: the parsed letter equals the gold letter; open-ended: the first integer equals the answer."""
    letter = answer_letter(row)
    if letter is not None:
        return parse_answer(output, len(row["choices"])) == letter
    m = _INT.search(output or "")
    try:
        return m is not None and int(m.group(0)) == int(str(row["answer"]).strip())
    except ValueError:
        return False
