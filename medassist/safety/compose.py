"""The final answer: escalation first, then vetted guidance (emergency or crisis) or the guarded generated text,
then the closing lines; the disclaimer is added by code, never by the model."""
from medassist.safety.guard import StreamGuard, guard_answer
from medassist.safety.lines import CLOSING_LINES, DISCLAIMER, GUARD_FLAGS, SCREEN_FLAGS
from medassist.safety.screen import Screening


def closing_lines(screening: Screening) -> tuple[str, ...]:
    """The fixed lines that end an answer, in order: DECIDE_LINE for a dosing request, DIAGNOSIS_LINE for a
    diagnosis request (for streaming: preface, guarded text, these lines, then the disclaimer)."""
    return tuple(line for flag, line in CLOSING_LINES if flag in screening.flags)


def fixed_lines(screening: Screening) -> tuple[str, ...]:
    """Everything the code itself shows in this answer; the guard drops model sentences that repeat one."""
    return tuple(p for p in (screening.preface, screening.guidance, *closing_lines(screening)) if p)


def stream_guard(screening: Screening) -> StreamGuard:
    """The guard for this answer's generated text."""
    return StreamGuard(fixed_lines(screening))


def compose(screening: Screening, generated: str) -> dict:
    """Build the record for one answer: {"answer": str, "disclaimer": DISCLAIMER, "flags": list}.

    answer = screening preface + (vetted guidance if urgent, else the guarded generated text) + closing lines, as
    paragraphs. For an emergency or crisis the generated text is not shown at all: nothing after the escalation
    may reassure or delay."""
    if not isinstance(screening, Screening):
        raise ValueError("compose needs the Screening returned by screen_question(question)")
    if not isinstance(generated, str):
        raise ValueError(f"generated text must be a str, got {type(generated).__name__}")
    body, guard_flags = ("", ()) if screening.urgent else guard_answer(generated, fixed_lines(screening))
    parts = (screening.preface, screening.guidance, body, *closing_lines(screening))
    flags = [f for f in SCREEN_FLAGS + GUARD_FLAGS if f in screening.flags or f in guard_flags]
    return {"answer": "\n\n".join(p for p in parts if p), "disclaimer": DISCLAIMER, "flags": flags}


def render(record: dict) -> str:
    """Return the text a person reads: the answer, a blank line, then DISCLAIMER (always)."""
    if not isinstance(record, dict) or not isinstance(record.get("answer"), str):
        raise ValueError("render needs a record from compose() with a str 'answer'")
    return f"{record['answer']}\n\n{DISCLAIMER}" if record["answer"] else DISCLAIMER


def unrender(text: str) -> str:
    """An earlier answer as a client sends it back (`render`'s text) without the disclaimer the code added: what
    goes into the model's context as its own turn (it never wrote the disclaimer, and was not trained to)."""
    text = text.strip()
    return text.removesuffix(DISCLAIMER).strip() if text.endswith(DISCLAIMER) else text
