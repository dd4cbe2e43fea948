"""Parsing and validating what a reasoning LLM wrote, in the shapes DeepSeek-R1 really produces.

Generation answers: an optional `<think>...</think>` preamble (or only its closing tag, when a
server's chat template swallowed the opening one; or the thinking delivered separately as
`reasoning_content`), then either JSON (bare, in a ``` fence, with trailing commas, with literal
newlines or typographic quotes) or the paper's QUESTION / OPTIONS / ANSWER / REASONS layout. One
answer may hold one item or a list of them. Every item is validated on its own, so one bad item
never costs its siblings:

- multiple-choice: exactly four distinct, non-empty options; the answer resolves to one of them
  whether written `B`, `(B)`, `b`, `B. text`, `B) text`, `Option B`, `The answer is B` or as the
  option's text; a letter whose text names a different option is rejected as inconsistent;
- open-ended: no options, an answer that is more than a lone letter;
- a question, an answer and non-empty reasoning;
- the question, options and answer never speak of captions (the person answering watches the
  video), and carry no `<think>`/`<answer>` tags (they would corrupt the training target).

The generator's raw reasoning may speak of captions: it read them, and rewriting that into reasoning
about the video is exactly what refinement is for; the refined reasoning is checked instead
(`parse_refinement`). An answer cut at the token limit (`finish_reason=length`) is rejected whole:
the JSON of a truncated answer cannot be trusted to hold every field it was meant to.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from tasks.qa.prompts import LETTERS

# error kinds (the failures table's error_kind)
TRUNCATED = "truncated"
NO_ANSWER = "no_answer"
MALFORMED = "malformed_answer"
MISSING_QUESTION = "missing_question"
MISSING_ANSWER = "missing_answer"
EMPTY_REASONING = "empty_reasoning"
BAD_OPTIONS = "bad_options"
ANSWER_NOT_IN_OPTIONS = "answer_not_in_options"
ANSWER_MISMATCH = "answer_mismatch"
WRONG_QUESTION_TYPE = "wrong_question_type"
MENTIONS_CAPTIONS = "mentions_captions"
REASONING_TAGS = "reasoning_tags"
REFINE_TRUNCATED = "refine_truncated"
REFINE_EMPTY = "refine_empty"
REFINE_MENTIONS_CAPTIONS = "refine_mentions_captions"
REFINE_MALFORMED = "refine_malformed"


@dataclass(frozen=True)
class ParsedItem:
    question: str
    options: tuple[str, ...] | None  # option texts in A-D order (no letter prefixes); None if open-ended
    answer: str  # the letter for multiple-choice, the answer text for open-ended
    reasoning: str


@dataclass(frozen=True)
class ItemFailure:
    kind: str
    message: str
    question: str | None = None  # when known, so the failure can be tied to a qa id


@dataclass(frozen=True)
class ParseResult:
    items: list[ParsedItem]
    failures: list[ItemFailure]


class ParseFailure(ValueError):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


_CAPTION_WORD = re.compile(r"\bcaption", re.IGNORECASE)
_TAGS = re.compile(r"</?\s*(?:think|answer)\s*>", re.IGNORECASE)
_CLOSER = re.compile(r"\s*[}\]]")
_FENCE = re.compile(r"```[A-Za-z0-9_-]*[ \t]*\n?(.*?)(?:```|\Z)", re.DOTALL)
_KEY_ALIASES = {
    "question": ("question", "q", "query"),
    "options": ("options", "choices", "option", "candidates"),
    "answer": ("answer", "correctanswer", "correct", "ans", "finalanswer", "correctoption"),
    "reasoning": ("reasoning", "reasons", "reason", "rationale", "explanation", "reasoningsteps", "steps", "chainofthought", "cot"),
}
_LAYOUT_LABEL = re.compile(
    r"^[ \t>*#_-]*(?:\d+[.)][ \t]*)?"
    r"(?P<label>question|options|choices|correct answer|answer|reasons|reasoning|reason)"
    r"(?:[ \t]*\d+)?[ \t*_]*[:：][ \t*_]*(?P<rest>.*)$",
    re.IGNORECASE | re.MULTILINE,
)
_OPTION_LINE = re.compile(r"^[ \t*_-]*\(?([A-Da-d])[ \t]*[.):：][ \t*_]*(.*)$")
_INLINE_OPTIONS = re.compile(r"(?:^|\s)\(?([A-D])[.)]\s+")
_PREFIX = re.compile(r"^\s*(?:\(([A-Da-d])\)|([A-Da-d])\s*[.):：])\s*")
_ANSWER_PHRASE = r"(?i:(?:the\s+)?(?:correct\s+|final\s+)?(?:answer|option|choice)(?:\s+is)?\s*[:：]?\s*)"
_BARE_LETTER = re.compile(rf"^{_ANSWER_PHRASE}?\(?\s*([A-Da-d])\s*\)?[.!]?$")
_LETTER_THEN_TEXT = re.compile(rf"^{_ANSWER_PHRASE}?(?:\(([A-Da-d])\)|([A-D])\s*[.):：-]|([a-d])[.)])\s*(.+)$", re.DOTALL)


def strip_thinking(content: str) -> str:
    """The answer part of a completion (thinking delivered as `reasoning_content` never reaches here)."""
    if "</think>" in content:
        return content.rpartition("</think>")[2].strip()
    if "<think>" in content:  # opened and never closed: the model ran out before answering
        return content.partition("<think>")[0].strip()
    return content.strip()


def mentions_captions(text: str) -> bool:
    return bool(_CAPTION_WORD.search(text))


# -- JSON ---------------------------------------------------------------------------------------


def _balanced_spans(text: str) -> list[str]:
    """Top-level {...} / [...] spans, string-aware; an unclosed last span runs to the end."""
    spans, depth, start, in_string, escaped = [], 0, -1, False, False
    for i, ch in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
            continue
        if ch == '"' and depth:
            in_string = True
        elif ch in "{[":
            if depth == 0:
                start = i
            depth += 1
        elif ch in "}]" and depth:
            depth -= 1
            if depth == 0:
                spans.append(text[start : i + 1])
    if depth:
        spans.append(text[start:])
    return spans


def _drop_trailing_commas(text: str) -> str:
    out, in_string, escaped = [], False, False
    for i, ch in enumerate(text):
        if in_string:
            out.append(ch)
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
            continue
        if ch == '"':
            in_string = True
        elif ch == "," and _CLOSER.match(text, i + 1):
            continue
        out.append(ch)
    return "".join(out)


def _loads(text: str) -> Any:
    # strict=False: R1 writes literal newlines inside JSON strings.
    try:
        return json.loads(text, strict=False)
    except json.JSONDecodeError:
        pass
    try:
        return json.loads(_drop_trailing_commas(text), strict=False)
    except json.JSONDecodeError:
        pass
    # Typographic quotes used as JSON delimiters; only tried last, since they are legal inside strings.
    smart = text.replace("\u201c", '"').replace("\u201d", '"')
    if smart != text:
        return _loads(smart)
    raise ValueError("not JSON")


def _json_values(text: str) -> Iterator[Any]:
    """Every JSON value in the text, fenced ones first (lazily: the first good one usually ends the search)."""
    for candidate in [*(m.group(1) for m in _FENCE.finditer(text)), text]:
        for span in _balanced_spans(candidate):
            try:
                yield _loads(span)
            except ValueError:
                continue


def _norm_key(key: str) -> str:
    return re.sub(r"[^a-z]", "", key.lower())


def _fields(record: dict[str, Any]) -> dict[str, Any]:
    """A record's fields under their canonical names (question, options, answer, reasoning)."""
    keys = {_norm_key(str(k)): v for k, v in record.items()}
    out = {}
    for name, aliases in _KEY_ALIASES.items():
        for alias in aliases:
            if alias in keys:
                out[name] = keys[alias]
                break
    return out


def _canonical(record: dict[str, Any]) -> dict[str, Any] | None:
    """The record's canonical fields, or None when it does not look like a QA item."""
    fields = _fields(record)
    return fields if "question" in fields else None


def _records(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, list):
        return [r for v in value if isinstance(v, dict) for r in _records(v)]
    if not isinstance(value, dict):
        return []
    record = _canonical(value)
    if record is not None:
        return [record]
    for inner in value.values():  # {"questions": [...]}, {"items": [...]}, {"result": {...}}
        found = _records(inner)
        if found:
            return found
    return []


# -- the QUESTION / OPTIONS / ANSWER / REASONS layout --------------------------------------------


def _layout_records(text: str) -> list[dict[str, Any]]:
    """Records of labelled sections; each QUESTION label starts a new record."""
    records: list[dict[str, list[str]]] = []
    field = None
    for line in text.splitlines():
        m = _LAYOUT_LABEL.match(line)
        if m:
            label = m.group("label").lower()
            field = {"choices": "options", "correct answer": "answer", "reasons": "reasoning", "reason": "reasoning"}.get(label, label)
            if field == "question" or not records:
                records.append({})
            records[-1][field] = [m.group("rest")]
        elif records and field is not None:
            records[-1][field].append(line)
    joined = [{k: "\n".join(v).strip().strip("*").strip() for k, v in rec.items()} for rec in records]
    return [rec for rec in joined if "question" in rec]


def extract_records(answer_text: str) -> list[dict[str, Any]]:
    """QA-item-like records from an answer's text: JSON first, else the layout."""
    for value in _json_values(answer_text):
        found = _records(value)
        if found:
            return found
    return _layout_records(answer_text)


# -- fields -------------------------------------------------------------------------------------


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
        return "\n".join(str(v).strip() for v in value if str(v).strip())
    raise ParseFailure(MALFORMED, f"expected text, got {type(value).__name__}")


def _norm(text: str) -> str:
    text = re.sub(r"\s+", " ", text).strip().strip("*_`\"'\u201c\u201d\u2018\u2019 ").rstrip(".,;:!")
    return text.casefold().strip()


def _strip_prefix(text: str, letter: str) -> str:
    m = _PREFIX.match(text)
    if m and (m.group(1) or m.group(2)).upper() == letter:
        return text[m.end() :].strip()
    return text.strip()


def normalize_options(value: Any) -> list[str]:
    """Options in A-D order, letter prefixes removed, from a dict, a list or a block of lines."""
    if isinstance(value, dict):
        by_letter: dict[str, str] = {}
        for key, text in value.items():
            letter = re.sub(r"(?i)^option\s*|[^A-Za-z]", "", str(key)).upper()
            if letter not in LETTERS or letter in by_letter:
                raise ParseFailure(BAD_OPTIONS, f"options must be keyed A-D, got key {key!r}")
            by_letter[letter] = _strip_prefix(_text(text), letter)
        options = [by_letter[letter] for letter in LETTERS if letter in by_letter]
        if len(options) != len(by_letter):
            raise ParseFailure(BAD_OPTIONS, f"options must be keyed A-D, got {sorted(by_letter)}")
    elif isinstance(value, list):
        options = [_strip_prefix(_text(v), LETTERS[i]) if i < len(LETTERS) else _text(v) for i, v in enumerate(value)]
    elif isinstance(value, str):
        lines = [ln for ln in value.splitlines() if ln.strip()]
        parsed = [_OPTION_LINE.match(ln) for ln in lines]
        if len(lines) > 1 and all(parsed):
            if [m.group(1).upper() for m in parsed if m] != list(LETTERS[: len(parsed)]):
                raise ParseFailure(BAD_OPTIONS, "option lines are not lettered A, B, C, D in order")
            options = [m.group(2).strip() for m in parsed if m]
        else:  # all on one line: "A. x B. y C. z D. w"
            pieces = _INLINE_OPTIONS.split(value)
            options = [pieces[i + 1].strip() for i in range(1, len(pieces) - 1, 2)]
    else:
        raise ParseFailure(BAD_OPTIONS, "no options given")
    if len(options) != 4:
        raise ParseFailure(BAD_OPTIONS, f"expected 4 options, got {len(options)}")
    if any(not o for o in options):
        raise ParseFailure(BAD_OPTIONS, "an option is empty")
    if len({_norm(o) for o in options}) != 4:
        raise ParseFailure(BAD_OPTIONS, "options are not distinct")
    return options


def resolve_choice(answer: str, options: list[str]) -> str:
    """The letter an answer designates, or ParseFailure when it designates none (or two)."""
    text = answer.strip().strip("*_` ")
    if not text:
        raise ParseFailure(MISSING_ANSWER, "the answer is empty")
    normalized = [_norm(o) for o in options]
    if _norm(text) in normalized:  # the option's own text (checked first: an option may start "A ...")
        return LETTERS[normalized.index(_norm(text))]
    m = _BARE_LETTER.match(text)
    if m:
        return m.group(1).upper()
    m = _LETTER_THEN_TEXT.match(text)
    if m:
        letter = (m.group(1) or m.group(2) or m.group(3)).upper()
        rest = _norm(m.group(4))
        if rest in normalized and normalized.index(rest) != LETTERS.index(letter):
            raise ParseFailure(ANSWER_MISMATCH, f"the answer {answer!r} names option {letter} but quotes option {LETTERS[normalized.index(rest)]}")
        return letter
    m = re.match(r"^([A-D])\s+(.+)$", text, re.DOTALL)  # "B On the table": only with B's own text
    if m and _norm(m.group(2)) == normalized[LETTERS.index(m.group(1))]:
        return m.group(1)
    raise ParseFailure(ANSWER_NOT_IN_OPTIONS, f"the answer {answer!r} is none of the options")


def validate_record(record: dict[str, Any], question_type: str) -> ParsedItem:
    question = _text(record.get("question"))
    if not question:
        raise ParseFailure(MISSING_QUESTION, "the item has no question")
    answer = _text(record.get("answer"))
    if not answer:
        raise ParseFailure(MISSING_ANSWER, "the item has no answer")
    reasoning = _text(record.get("reasoning"))
    if not reasoning:
        raise ParseFailure(EMPTY_REASONING, "the item has no reasoning")
    raw_options = record.get("options")
    options: list[str] | None = None
    if question_type == "multiple_choice":
        options = normalize_options(raw_options)
        answer = resolve_choice(answer, options)
    else:
        if raw_options:
            raise ParseFailure(WRONG_QUESTION_TYPE, "an open-ended question came with options")
        if _BARE_LETTER.match(answer):
            raise ParseFailure(WRONG_QUESTION_TYPE, f"an open-ended answer that is only a letter: {answer!r}")
    visible = [question, answer, *(options or [])]
    if any(mentions_captions(t) for t in visible):
        raise ParseFailure(MENTIONS_CAPTIONS, "the question, options or answer mention captions, which whoever answers never sees")
    if any(_TAGS.search(t) for t in visible):
        raise ParseFailure(REASONING_TAGS, "the question, options or answer contain <think>/<answer> tags")
    return ParsedItem(question, tuple(options) if options is not None else None, answer, reasoning)


def parse_generation(content: str, question_type: str, *, finish_reason: str | None = "stop") -> ParseResult:
    """All valid items of one generation answer, and one failure per invalid item (or for the whole)."""
    if finish_reason == "length":
        return ParseResult([], [ItemFailure(TRUNCATED, "the answer was cut at the token limit (finish_reason=length)")])
    answer_text = strip_thinking(content)
    if not answer_text:
        return ParseResult([], [ItemFailure(NO_ANSWER, "the model wrote no answer after its thinking")])
    records = extract_records(answer_text)
    if not records:
        return ParseResult([], [ItemFailure(MALFORMED, "no JSON item and no QUESTION/ANSWER layout found in the answer")])
    items, failures = [], []
    for record in records:
        try:
            items.append(validate_record(record, question_type))
        except ParseFailure as exc:
            question = record.get("question")
            failures.append(ItemFailure(exc.kind, exc.message, question.strip() if isinstance(question, str) and question.strip() else None))
    return ParseResult(items, failures)


_HEADING = re.compile(r"^\s*[*#_ ]*(?:refined|rewritten|revised|concise)?\s*reasoning\s*[*_ ]*:[*_ ]*", re.IGNORECASE)


def parse_refinement(content: str, *, finish_reason: str | None = "stop") -> str:
    """The rewritten reasoning of a refinement answer; ParseFailure if unusable as a training target."""
    if finish_reason == "length":
        raise ParseFailure(REFINE_TRUNCATED, "the refinement was cut at the token limit (finish_reason=length)")
    text = strip_thinking(content)
    fenced = _FENCE.search(text)
    if fenced and not text[: fenced.start()].strip():
        text = fenced.group(1)
    if text.lstrip().startswith("{"):  # {"reasoning": "..."}: a model that could not resist JSON
        for value in _json_values(text):
            if isinstance(value, dict) and _fields(value).get("reasoning"):
                text = _text(_fields(value)["reasoning"])
                break
    text = _HEADING.sub("", text, count=1).strip()
    if not text:
        raise ParseFailure(REFINE_EMPTY, "the refinement is empty")
    if mentions_captions(text):
        raise ParseFailure(REFINE_MENTIONS_CAPTIONS, "the refined reasoning still mentions captions")
    if _TAGS.search(text):
        raise ParseFailure(REFINE_MALFORMED, "the refined reasoning contains <think>/<answer> tags")
    return text
