"""Prompt formatting, training targets and answer parsing (BLINK's official scoring rule, a judge-free matcher
against the choices, or a lenient rule)."""

from __future__ import annotations

import re
import string

from livr.data.answers import parse_match
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


PARSERS = ("blink", "lenient", "match")
FAILED = "(Z)"  # BLINK's marker for an output its LLM judge could not match to a choice

_BLINK_BARE = ("A", "B", "C", "D", "E")
_NUMBER = re.compile(r"[-+]?\d+")
_UNITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
          "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
NUMBER_WORDS: dict[str, int] = {w: i for i, w in enumerate(_UNITS)}
for _t, _w in enumerate(_TENS, start=2):
    NUMBER_WORDS[_w] = 10 * _t
    for _u in range(1, 10):
        NUMBER_WORDS[f"{_w}-{_UNITS[_u]}"] = NUMBER_WORDS[f"{_w} {_UNITS[_u]}"] = 10 * _t + _u
NUMBER_WORDS["one hundred"] = NUMBER_WORDS["a hundred"] = 100


def _check_parser(parser: str) -> None:
    if parser not in PARSERS:
        raise DataError(f"answer parser must be one of {', '.join(PARSERS)}, got {parser!r}")


def _parse_blink(output: str, num_choices: int) -> str | None:
    """BLINK's `analyze_answer` (eval/test_benchmark.py), exactly, with "no answer" where BLINK asks its
    GPT-3.5 judge: the whole output (not stripped) is a bare letter A-E or "(A)"-"(E)" (any valid letter
    when there are more than five choices; out-of-range letters are kept, and scored wrong, as BLINK's);
    else "(X)" must be a whole whitespace-separated token: exactly one valid "(X)" in the last paragraph
    ("\n\n"-separated) wins, else exactly one in the whole output; anything else is None."""
    letters = choice_letters(num_choices)
    bare = set(_BLINK_BARE) | set(letters)
    if output in bare:
        return output
    if len(output) == 3 and output[0] == "(" and output[2] == ")" and output[1] in bare:
        return output[1]
    valid = {f"({x})" for x in letters}
    anywhere = valid & set(output.split())
    last = valid & set(output.split("\n\n")[-1].split())
    if (len(anywhere) != 1 and len(last) != 1) or len(anywhere) < 1:
        return None
    return (last if len(last) == 1 else anywhere).pop()[1]


def _unique(text: str, valid: set[str]) -> set[str]:
    return {m for m in _PAREN.findall(text) if m in valid}


def _parse_lenient(output: str, num_choices: int) -> str | None:
    """The permissive variant: the stripped output is "A" or "(A)"; else a unique "(X)" anywhere in the
    text (also inside "**(A)**" or "(D),"), or else in its last paragraph. Out-of-range letters: None."""
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


def parse_answer(output: str, num_choices: int, parser: str = "blink", choices: list[str] | None = None) -> str | None:
    """The choice letter an output selects, or None (no answer).

    parser="blink": BLINK's official rule exactly (see `_parse_blink`; None where BLINK would fall back
    to its GPT-3.5 judge). parser="match": BLINK's rule first, then, where it does not decide, a
    deterministic match against the letter forms and the row's `choices` texts (`livr.data.answers`: the
    judge-free stand-in for BLINK's judge). parser="lenient": stripped output, "(X)" found anywhere (even
    glued to punctuation or markdown)."""
    _check_parser(parser)
    if not isinstance(output, str) or not output:
        return None
    if parser == "lenient":
        return _parse_lenient(output, num_choices)
    letter = _parse_blink(output, num_choices)
    if letter is None and parser == "match":
        letter = parse_match(output, choice_letters(num_choices), choices)
    return letter


def normalise_number(text) -> int | None:
    """An open-ended answer as an integer: the whole text (stripped, lower-cased, one trailing period
    dropped) must be a number ("3") or its English word ("three", "twenty-one"); else None."""
    if not isinstance(text, str):
        return None
    t = text.strip().lower()
    if t.endswith("."):
        t = t[:-1].rstrip()
    if _NUMBER.fullmatch(t):
        return int(t)
    return NUMBER_WORDS.get(" ".join(t.split()))


def parse_number(output: str, parser: str = "blink") -> int | None:
    """Open-ended rows: "blink" and "match" = exact match of the whole normalised output
    (`normalise_number`); "lenient" = the first integer anywhere in the output ("3 or 4" -> 3)."""
    _check_parser(parser)
    if parser != "lenient":
        return normalise_number(output)
    m = _INT.search(output or "")
    return int(m.group(0)) if m else None


def predicted(output: str, row: dict, parser: str = "blink") -> str | None:
    """What an output answers, as it is recorded and submitted: "(X)" for a multiple-choice row, the
    number as a string for an open-ended one; None when nothing is parsed."""
    if row.get("choices"):
        letter = parse_answer(output, len(row["choices"]), parser, row["choices"])
        return None if letter is None else f"({letter})"
    n = parse_number(output, parser)
    return None if n is None else str(n)


def is_correct(output: str, row: dict, parser: str = "blink") -> bool:
    """MC: the parsed letter equals the gold letter; open-ended: the parsed number equals the answer
    (under "blink" the whole output must be the number, as a numeral or an English word)."""
    letter = answer_letter(row)
    if letter is not None:
        return parse_answer(output, len(row["choices"]), parser, row["choices"]) == letter
    gold = normalise_number(str(row["answer"]))
    return gold is not None and parse_number(output, parser) == gold
