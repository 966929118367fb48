"""The final answer: escalation first, then vetted guidance (emergency or crisis) or the guarded generated text,
then the closing lines; the disclaimer is added by code, never by the model."""
from medassist.safety.guard import StreamGuard, guard_answer
from medassist.safety.lines import CLOSING_LINES, DISCLAIMER, GUARD_FLAGS, NO_SOURCE_LINE, SCREEN_FLAGS, SOURCE_LINE
from medassist.safety.screen import Screening


def closing_lines(screening: Screening) -> tuple[str, ...]:
    """The fixed lines that end an answer, in order: DECIDE_LINE for a dosing request, DIAGNOSIS_LINE for a
    diagnosis request (for streaming: preface, guarded text, these lines, then the disclaimer)."""
    return tuple(line for flag, line in CLOSING_LINES if flag in screening.flags)


def fixed_lines(screening: Screening) -> tuple[str, ...]:
    """Everything the code itself shows in this answer; the guard drops model sentences that repeat one."""
    return tuple(p for p in (screening.preface, screening.guidance, *closing_lines(screening)) if p)


def stream_guard(screening: Screening, false_claims: tuple[str, ...] = ()) -> StreamGuard:
    """The guard for this answer's generated text (`false_claims`: see StreamGuard)."""
    return StreamGuard(fixed_lines(screening), false_claims)


def compose(screening: Screening, generated: str, false_claims: tuple[str, ...] = ()) -> dict:
    """Build the record for one answer: {"answer": str, "disclaimer": DISCLAIMER, "flags": list}.

    answer = screening preface + (vetted guidance if urgent, else the guarded generated text) + closing lines, as
    paragraphs. For an emergency or crisis the generated text is not shown at all: nothing after the escalation
    may reassure or delay."""
    if not isinstance(screening, Screening):
        raise ValueError("compose needs the Screening returned by screen_question(question)")
    if not isinstance(generated, str):
        raise ValueError(f"generated text must be a str, got {type(generated).__name__}")
    body, guard_flags = ("", ()) if screening.urgent else guard_answer(generated, fixed_lines(screening),
                                                                       false_claims)
    parts = (screening.preface, screening.guidance, body, *closing_lines(screening))
    flags = [f for f in SCREEN_FLAGS + GUARD_FLAGS if f in screening.flags or f in guard_flags]
    return {"answer": "\n\n".join(p for p in parts if p), "disclaimer": DISCLAIMER, "flags": flags}


def render(record: dict) -> str:
    """Return the text a person reads: the answer, a blank line, then DISCLAIMER (always)."""
    if not isinstance(record, dict) or not isinstance(record.get("answer"), str):
        raise ValueError("render needs a record from compose() with a str 'answer'")
    return f"{record['answer']}\n\n{DISCLAIMER}" if record["answer"] else DISCLAIMER


def sources_text(sources: list[dict]) -> str:
    """The paragraph after a grounded answer: one SOURCE_LINE per passage used, or NO_SOURCE_LINE."""
    if not sources:
        return NO_SOURCE_LINE
    return "\n".join(SOURCE_LINE.format(title=s["title"], where=", ".join(x for x in (s["source"], s["url"]) if x))
                     for s in sources)


def with_sources(composed: dict, sources: list[dict] | None) -> dict:
    """`composed` with the sources of a grounded answer: "sources" and their lines after the answer (None: no
    index was used, nothing added)."""
    if sources is None:
        return composed
    answer = "\n\n".join(p for p in (composed["answer"], sources_text(sources)) if p)
    return {**composed, "answer": answer, "sources": sources}


def unrender(text: str) -> str:
    """An earlier answer as a client sends it back (`render`'s text) as the model's own turn: without the paragraphs
    the code added after the model's text (closing lines, source lines, the disclaimer). The model never wrote them
    and was not trained on them; a model that learnt to imitate a source line could cite what it never read. The
    escalation stays: it is what was said to the person."""
    added = {DISCLAIMER, NO_SOURCE_LINE, *(line for _, line in CLOSING_LINES)}
    head = SOURCE_LINE.split("{", 1)[0]
    kept = [p for p in text.strip().split("\n\n")
            if p.strip() not in added and not all(line.startswith(head) for line in p.strip().splitlines())]
    return "\n\n".join(kept).strip()
