"""Safety layer for medassist: validates questions, screens them for red flags (emergency,
crisis, dosing, diagnosis, prompt injection), guards generated text and composes the final
answer with its fixed disclaimer. Plain text in, text out; the rules are the tables in
medassist/safety_rules.py."""
import re
import unicodedata
from dataclasses import dataclass

from medassist.safety_rules import (ACCIDENT_CONTEXT, CONDITIONAL, CRISIS_RULES, DIAGNOSIS_RULES, DOSING_RULES,
                                    EDUCATIONAL, EMERGENCY_ALWAYS, EMERGENCY_RULES, GUARD_RULES, INJECTION_RULES,
                                    NOW, PAST, PERSONAL_NOW, CONTRACTIONS)

DISCLAIMER = ("This information is educational and is not a diagnosis or medical advice. "
              "For advice about your own health, talk to a doctor, nurse or pharmacist.")
EMERGENCY_LINE = ("This may be a medical emergency. Call your local emergency number (such as 911 or 112) "
                  "or go to the nearest emergency department now.")
CRISIS_LINE = ("If you are thinking about suicide or harming yourself, call or text 988 (US) or your local "
               "crisis line now, or call your emergency number if you are in danger.")
DECIDE_LINE = ("Only a doctor or pharmacist who knows your health history can decide on a medicine, "
               "a dose or a schedule for you.")
DIAGNOSIS_LINE = "I can't tell what is causing your symptoms; a doctor who can examine you can."

SCREEN_FLAGS = ("emergency", "crisis", "dosing_request", "diagnosis_request", "prompt_injection")
GUARD_FLAGS = ("dose_removed", "diagnosis_removed", "doctor_claim_removed", "contact_removed")
CLOSING_LINES = (("dosing_request", DECIDE_LINE), ("diagnosis_request", DIAGNOSIS_LINE))
# The code appends the disclaimer itself; an echo of it by the model is dropped so it is not shown twice.
_DISCLAIMER_SENTENCES = frozenset(re.split(r"(?<=\.) ", DISCLAIMER))


# ============================================================== questions
def validate_question(text: str, max_chars: int | None = None) -> str:
    """Return ``text`` stripped, with CRLF/CR turned into LF and tabs into spaces.

    Raises ValueError if it is not a str, is empty or whitespace only, contains control
    characters other than newline and tab, or is longer than ``max_chars``."""
    if not isinstance(text, str):
        raise ValueError(f"question must be a str, got {type(text).__name__}; pass the question text")
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", " ").strip()
    if not text:
        raise ValueError("question is empty or whitespace only; type a question")
    bad = next((c for c in text if c != "\n" and unicodedata.category(c) == "Cc"), None)
    if bad is not None:
        raise ValueError(f"question contains the control character {bad!r}; remove it and send plain text")
    if max_chars is not None and (not isinstance(max_chars, int) or max_chars < 1):
        raise ValueError(f"max_chars must be a positive int or None, got {max_chars!r}")
    if max_chars is not None and len(text) > max_chars:
        raise ValueError(f"question is {len(text)} characters, over the limit of {max_chars}; shorten it")
    return text


def _normalise(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).lower().replace("\u2019", "'").replace("\u2018", "'")
    text = re.sub(r"\s+", " ", text).strip()
    return re.sub(r"\b\w+\b", lambda m: CONTRACTIONS.get(m.group(), m.group()), text)


def _all(patterns: tuple, text: str) -> bool:
    return all(re.search(p, text) for p in patterns)


def _fires(rules: dict, text: str) -> bool:
    return any(_all(patterns, text) for patterns in rules.values())


@dataclass(frozen=True)
class Screening:
    """Result of screen_question: flags fired (in SCREEN_FLAGS order) and the text that must
    be shown before any generated text ("" when none)."""
    flags: tuple[str, ...]
    preface: str


def screen_question(question: str) -> Screening:
    """Screen a user question for emergency, crisis, dosing, diagnosis and prompt-injection rules."""
    if not isinstance(question, str):
        raise ValueError(f"question must be a str, got {type(question).__name__}")
    q = _normalise(question)
    current = bool(re.search(PERSONAL_NOW, q)) or not re.search(EDUCATIONAL, q)
    past_only = bool(re.search(PAST, q)) and not re.search(NOW, q)
    # Unlike emergencies, a crisis is not dismissed as past: past attempts raise present risk.
    crisis = current and (_all(CRISIS_RULES["suicide"], q)
                          or (_all(CRISIS_RULES["self_harm"], q) and not re.search(ACCIDENT_CONTEXT, q)))
    emergency = crisis or _fires(EMERGENCY_ALWAYS, q) or (current and not past_only and _fires(EMERGENCY_RULES, q))
    fired = {"emergency": emergency, "crisis": crisis, "dosing_request": _fires(DOSING_RULES, q),
             "diagnosis_request": _fires(DIAGNOSIS_RULES, q), "prompt_injection": _fires(INJECTION_RULES, q)}
    preface = "\n".join(line for line, on in ((EMERGENCY_LINE, emergency), (CRISIS_LINE, crisis)) if on)
    return Screening(tuple(f for f in SCREEN_FLAGS if fired[f]), preface)


# ============================================================== answers
def _sentence_flags(sentence: str) -> list[str]:
    s = _normalise(sentence)
    unconditional = re.sub(CONDITIONAL, " ", s)
    return [flag for flag, rules in GUARD_RULES.items()
            if _fires(rules, unconditional if flag == "diagnosis_removed" else s)]


class StreamGuard:
    """guard_answer for token streams.

    feed(chunk) returns the text that is safe to show now (whole sentences that passed the
    guard; an unfinished sentence is held back); close() returns the rest. Everything returned,
    joined, equals guard_answer(full_text)[0]. ``flags``: guard flags fired so far."""

    # A sentence ends at whitespace that follows . ! ? (plus closing quotes/brackets) or
    # contains a line break; that whitespace is complete once a non-space character follows.
    _SPACE = re.compile(r"\s+")
    _END = re.compile(r"[.!?][\"')\]]*\Z")

    def __init__(self) -> None:
        self._buf, self._scan, self._sep, self._started, self._fired = "", 0, "", False, set()

    @property
    def flags(self) -> tuple[str, ...]:
        """Guard flags fired so far, in GUARD_FLAGS order."""
        return tuple(f for f in GUARD_FLAGS if f in self._fired)

    def _emit(self, sentence: str, sep: str) -> str:
        sentence = sentence.strip()
        flags = _sentence_flags(sentence) if sentence else []
        if flags or not sentence or sentence in _DISCLAIMER_SENTENCES:
            self._fired.update(flags)
            # A dropped sentence's two separators merge; keep the stronger break.
            self._sep = max(self._sep, sep, key=lambda s: s.count("\n"))
            return ""
        out = (re.sub(r"\n{3,}", "\n\n", self._sep) if self._started else "") + sentence
        self._started, self._sep = True, sep
        return out

    def feed(self, chunk: str) -> str:
        """Add generated text; return the part that is complete and safe to show now."""
        if not isinstance(chunk, str):
            raise ValueError(f"chunk must be a str, got {type(chunk).__name__}")
        self._buf += chunk.replace("\r", "")  # CRLF -> LF even when "\r" and "\n" arrive in different chunks
        out, start = [], 0
        # Resume where the last call stopped, so streaming stays linear in the text length.
        for m in self._SPACE.finditer(self._buf, self._scan):
            if m.end() == len(self._buf):  # trailing whitespace may continue in the next chunk
                break
            space = m.group()
            if "\n" in space or self._END.search(self._buf, max(start, m.start() - 12), m.start()):
                out.append(self._emit(self._buf[start:m.start()], space[space.find("\n"):] if "\n" in space else space))
                start = m.end()
        self._buf = self._buf[start:]
        trailing = len(self._buf) - len(self._buf.rstrip())
        self._scan = len(self._buf) - trailing
        return "".join(out)

    def close(self) -> str:
        """Flush the held-back text through the guard and return it."""
        rest, self._buf, self._scan = self._buf, "", 0
        return self._emit(rest, "") if rest.strip() else ""


def guard_answer(text: str) -> tuple[str, tuple[str, ...]]:
    """Remove sentences with dose instructions, diagnoses of the reader, doctor/prescriber claims or
    (invented) phone numbers and e-mail addresses from generated text.
    Returns (cleaned_text, flags in GUARD_FLAGS order)."""
    if not isinstance(text, str):
        raise ValueError(f"generated text must be a str, got {type(text).__name__}")
    guard = StreamGuard()
    cleaned = guard.feed(text) + guard.close()
    return cleaned, guard.flags


def closing_lines(screening: Screening) -> tuple[str, ...]:
    """The fixed lines that end an answer, in order: DECIDE_LINE for a dosing request, DIAGNOSIS_LINE for a
    diagnosis request (for streaming: preface, guarded text, these lines, then the disclaimer)."""
    return tuple(line for flag, line in CLOSING_LINES if flag in screening.flags)


def compose(screening: Screening, generated: str) -> dict:
    """Build the record for one answer: {"answer": str, "disclaimer": DISCLAIMER, "flags": list}.

    answer = screening preface + guarded generated text + closing_lines(screening), as paragraphs;
    the disclaimer is fixed here, never by the model."""
    if not isinstance(screening, Screening):
        raise ValueError("compose needs the Screening returned by screen_question(question)")
    if not isinstance(generated, str):
        raise ValueError(f"generated text must be a str, got {type(generated).__name__}")
    body, guard_flags = guard_answer(generated)
    parts = (screening.preface, body, *closing_lines(screening))
    flags = [f for f in SCREEN_FLAGS + GUARD_FLAGS if f in screening.flags or f in guard_flags]
    return {"answer": "\n\n".join(p for p in parts if p), "disclaimer": DISCLAIMER, "flags": flags}


def render(record: dict) -> str:
    """Return the text a person reads: the answer, a blank line, then DISCLAIMER (always)."""
    if not isinstance(record, dict) or not isinstance(record.get("answer"), str):
        raise ValueError("render needs a record from compose() with a str 'answer'")
    return f"{record['answer']}\n\n{DISCLAIMER}" if record["answer"] else DISCLAIMER
