"""Question files: the JSONL that predict, the safety screen and the server's tools read, one question per line.
No torch, no Lightning: the answer path and the training side both read questions through here."""
import json
from pathlib import Path

from medassist import UserError


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
