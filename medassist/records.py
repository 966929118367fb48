"""The answer record every path writes, and the question files predict reads (one question per line).
No torch, no Lightning: the answer path and the training side both build records and read questions through here."""
import json
from pathlib import Path
from typing import TypedDict

from medassist import UserError
from medassist.prompts import join_input

MAX_ERRORS = 20  # bad lines listed in one message


def listed(errors: list[str]) -> str:
    """The first MAX_ERRORS problems, one per line, and how many more there are."""
    more = f"\n... and {len(errors) - MAX_ERRORS} more" if len(errors) > MAX_ERRORS else ""
    return "\n".join(errors[:MAX_ERRORS]) + more


ROLES = ("system", "user", "assistant")
SHAPE = '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}'


def check_messages(messages, last: str) -> str | None:
    """What is wrong with a conversation (OpenAI's {"role", "content"} list), or None. `last`: the role it must end
    with ("assistant" in training data, "user" in questions to answer). A system message may only come first;
    after it, user and assistant turns alternate, starting with the user."""
    if not isinstance(messages, list) or not messages:
        return f"'messages' must be a non-empty list of {{'role', 'content'}} objects, like {SHAPE}"
    expected = "user"
    for n, m in enumerate(messages, start=1):
        if not isinstance(m, dict) or set(m) - {"role", "content", "name"}:
            return f"message {n} must be an object with 'role' and 'content' only, like {SHAPE}"
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            return f"message {n} has role {role!r}; use one of {', '.join(ROLES)}"
        if not isinstance(content, str) or not content.strip():
            return f"message {n} ({role}) has empty or non-string 'content'; give it the text of that turn"
        if role == "system":
            if n != 1:
                return f"message {n} is a system message after the first turn; a system message may only come first"
            continue
        if role != expected and n == 1 + (messages[0]["role"] == "system"):
            return f"message {n} is an assistant turn; the conversation must start with the user's turn"
        if role != expected:
            return (f"message {n} is a second {role} turn in a row; user and assistant turns must alternate, "
                    f"starting with the user (merge the two turns, or add the missing {expected} turn)")
        expected = "assistant" if role == "user" else "user"
    if messages[-1]["role"] != last:
        ends = "its answer (an assistant turn)" if last == "assistant" else "the question to answer (a user turn)"
        article = "an" if messages[-1]["role"] == "assistant" else "a"
        return f"the conversation ends with {article} {messages[-1]['role']} turn; it must end with {ends}"
    return None


def messages_of(record: dict) -> list[dict]:
    """A validated record as a conversation: its "messages", or an {"instruction", "input", "output"} pair as one
    user turn and one assistant turn (a pair is a one-turn conversation: one code path for both)."""
    if "messages" in record:
        return record["messages"]
    turn = [{"role": "user", "content": join_input(record["instruction"], record.get("input") or "")}]
    return turn + ([{"role": "assistant", "content": record["output"]}] if "output" in record else [])


class AnswerRecord(TypedDict, total=False):
    """One answer, as predict, the server, `python -m medassist predict` and the evaluator write it, keys in this
    order. An error record has "error" instead of "answer", "disclaimer" and "flags". `conversation`: the turns
    before the question, where it was a follow-up (so a batch output shows what each answer answered). `sources`:
    the passages a grounded answer was given ({"title", "source", "url", "score"}), only when an index was used."""

    id: str | int
    conversation: list[dict]
    question: str | None
    answer: str
    disclaimer: str
    flags: list[str]
    sources: list[dict]
    model: str
    adapter: str | None
    error: str


KEYS = tuple(AnswerRecord.__annotations__)


def answer_record(question: str, composed: dict, model: str = "", adapter: str | None = None,
                  context: dict | None = None) -> AnswerRecord:
    """The record of an answered question; `composed` is safety.compose's {"answer", "disclaimer", "flags"} (and
    "sources" after safety.with_sources); `context`: the question's "id" and earlier "conversation" turns."""
    return ordered({**(context or {}), "question": question, **composed, "model": model, "adapter": adapter})


def error_record(question: str | None, error: str, **source) -> AnswerRecord:
    """The record of a question that got no answer; `source`: model= and adapter= where a model was asked."""
    return ordered({"question": question, **source, "error": error})


def ordered(record: dict) -> AnswerRecord:
    """`record` with the keys of AnswerRecord only, in their order."""
    return {k: record[k] for k in KEYS if k in record}


def as_messages(question: str | list[dict]) -> list[dict]:
    """A question (text) or a conversation that ends with one, as a conversation."""
    return [{"role": "user", "content": question}] if isinstance(question, str) else question


def context_of(question: str | list[dict], id=None) -> dict:
    """The record fields that say what was answered beside the question itself: its id and, for a follow-up, the
    turns before it."""
    earlier = as_messages(question)[:-1]
    return {**({"id": id} if id is not None else {}), **({"conversation": earlier} if earlier else {})}


def read_questions(path: str | Path) -> list[dict]:
    """Questions for prediction, one JSON object per line: "question" (or "instruction", plus optional "input"), or
    a conversation that ends with the user's question ({"messages": [...]}, the OpenAI shape); an optional "id".

    Returns one dict per non-blank line, in order: {"line": n, "question": text or messages, "id"?}, or {"line": n,
    "error": "file:line: what is wrong"} for a bad line, so the other lines can still be answered. A missing or
    non-UTF-8 file raises.
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
        if line.strip():
            question, problem, id = _question_of(line)
            out.append({"line": line_no, "error": f"{path}:{line_no}: {problem}"} if problem else
                       {"line": line_no, "question": question, **({"id": id} if id is not None else {})})
    if not out:
        raise UserError(f"{path}: no questions; expected one {{\"question\": ...}} per line")
    return out


def _question_of(line: str) -> tuple[str | list | None, str | None, object]:
    """(question or messages, problem, id) of one line of a question file."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        return None, f"not valid JSON ({e.msg})", None
    if not isinstance(record, dict):
        return None, f"expected a JSON object, got {type(record).__name__}", None
    if "messages" in record:
        problem = check_messages(record["messages"], last="user")
        return record["messages"], problem, record.get("id")
    question = record.get("question", record.get("instruction", record.get("text")))
    if not isinstance(question, str) or not question.strip():
        return None, "needs a non-empty string 'question' (or a conversation: 'messages')", None
    return join_input(question, record.get("input") or ""), None, record.get("id")
