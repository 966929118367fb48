"""The answer record every path writes, and the question files predict reads (one question per line).
No torch, no Lightning: the answer path and the training side both build records and read questions through here."""
import json
from pathlib import Path
from typing import TypedDict

from medassist import UserError

MAX_ERRORS = 20  # bad lines listed in one message


def listed(errors: list[str]) -> str:
    """The first MAX_ERRORS problems, one per line, and how many more there are."""
    more = f"\n... and {len(errors) - MAX_ERRORS} more" if len(errors) > MAX_ERRORS else ""
    return "\n".join(errors[:MAX_ERRORS]) + more


class AnswerRecord(TypedDict, total=False):
    """One answer, as predict, the server, `python -m medassist predict` and the evaluator write it, keys in this
    order. An error record has "error" instead of "answer", "disclaimer" and "flags"."""

    question: str | None
    answer: str
    disclaimer: str
    flags: list[str]
    model: str
    adapter: str | None
    error: str


KEYS = tuple(AnswerRecord.__annotations__)


def answer_record(question: str, composed: dict, model: str = "", adapter: str | None = None) -> AnswerRecord:
    """The record of an answered question; `composed` is safety.compose's {"answer", "disclaimer", "flags"}."""
    return ordered({"question": question, **composed, "model": model, "adapter": adapter})


def error_record(question: str | None, error: str, **source) -> AnswerRecord:
    """The record of a question that got no answer; `source`: model= and adapter= where a model was asked."""
    return ordered({"question": question, **source, "error": error})


def ordered(record: dict) -> AnswerRecord:
    """`record` with the keys of AnswerRecord only, in their order."""
    return {k: record[k] for k in KEYS if k in record}


def read_questions(path: str | Path) -> list[dict]:
    """Questions for prediction, one JSON object per line with "question" (or "instruction", plus optional "input").

    Returns one dict per non-blank line, in order: {"question": text, "line": n}, or {"line": n, "error": "file:line:
    what is wrong"} for a bad line, so the other lines can still be answered. A missing or non-UTF-8 file raises.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found; expected JSONL with one {{\"question\": ...}} per line")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start}); save the file as UTF-8") from None
    out = []
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            out.append({"line": line_no, "error": f"{path}:{line_no}: not valid JSON ({e.msg})"})
            continue
        question = (record.get("question", record.get("instruction", record.get("text")))
                    if isinstance(record, dict) else None)
        if not isinstance(question, str) or not question.strip():
            out.append({"line": line_no, "error": f"{path}:{line_no}: needs a non-empty string 'question'"})
            continue
        extra = record.get("input") or ""
        out.append({"line": line_no, "question": f"{question.strip()}\n\n{extra.strip()}" if extra else question})
    if not out:
        raise UserError(f"{path}: no questions; expected one {{\"question\": ...}} per line")
    return out
