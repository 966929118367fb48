"""Screening a question or a conversation: the rules (rules.py) and the triage model (triage.py) each propose flags;
a flag fires when either does. Emergencies and crises get the escalation lines and vetted guidance (guidance.py)."""
import re
import unicodedata
from dataclasses import dataclass, field

from medassist.safety import guidance
from medassist.safety.lines import CRISIS_LINE, EMERGENCY_LINE, SCREEN_FLAGS
from medassist.safety.rules import (ACCIDENT_CONTEXT, ANIMAL, CRISIS_RULES, DIAGNOSIS_RULES, DOSING_RULES,
                                    EDUCATIONAL, EMERGENCY_ALWAYS, EMERGENCY_RULES, HUMAN, INJECTION_RULES, NOW, PAST,
                                    PERSONAL_NOW, PRESENT_RISK, RESOLVED, STUDY)
from medassist.safety.text import normalise

# How many of the latest user turns a conversation is screened over: enough for "my dad has chest pain" ...
# "what should I do?", and for an emergency said two turns ago that is plausibly still going on.
CONVERSATION_TURNS = 3


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


@dataclass(frozen=True)
class Screening:
    """Result of screen_question: flags fired (in SCREEN_FLAGS order), the text that must be shown before anything
    else ("" when none), the vetted guidance that replaces generated text for an emergency or crisis, which layer
    fired each flag, and the triage model's probabilities."""
    flags: tuple[str, ...]
    preface: str
    guidance: str = ""
    sources: dict = field(default_factory=dict)  # {flag: ["rules", "model"]}
    probabilities: dict = field(default_factory=dict)

    @property
    def urgent(self) -> bool:
        return "emergency" in self.flags or "crisis" in self.flags


def _all(patterns: tuple, text: str) -> bool:
    return all(re.search(p, text) for p in patterns)


def _fires(rules: dict, text: str) -> bool:
    return any(_all(patterns, text) for patterns in rules.values())


def rule_flags(question: str) -> set[str]:
    """The flags the regex rules raise for one (normalised) text."""
    q = normalise(question)
    current = bool(re.search(PERSONAL_NOW, q)) or not re.search(EDUCATIONAL, q)
    past_only = bool(re.search(PAST, q)) and not re.search(NOW, q)
    animal_only = bool(re.search(ANIMAL, q)) and not re.search(HUMAN, q)
    # Unlike emergencies, a crisis is not dismissed because a time is past ("last month", "again"): only a recovery
    # said in words, long ago and with no sign of a return, is.
    present = bool(re.search(PRESENT_RISK, q))
    resolved = _all(RESOLVED, q) and not present
    crisis = current and not resolved and (_all(CRISIS_RULES["suicide"], q)
                          or (_all(CRISIS_RULES["self_harm"], q) and not re.search(ACCIDENT_CONTEXT, q))
                          or (_all(CRISIS_RULES["topic"], q) and (present or not re.search(STUDY, q))))
    emergency = _fires(EMERGENCY_ALWAYS, q) or (current and not past_only and not animal_only
                                                 and _fires(EMERGENCY_RULES, q))
    fired = {"emergency": emergency, "crisis": crisis, "dosing_request": _fires(DOSING_RULES, q),
             "diagnosis_request": _fires(DIAGNOSIS_RULES, q), "prompt_injection": _fires(INJECTION_RULES, q)}
    return {flag for flag, on in fired.items() if on}


def _screening(text: str, by_rules: set[str], probabilities: dict, by_model: set[str]) -> Screening:
    # A crisis is escalated like an emergency (both lines, crisis line second), by whichever layer found it.
    by_rules = by_rules | ({"emergency"} if "crisis" in by_rules else set())
    by_model = by_model | ({"emergency"} if "crisis" in by_model else set())
    flags = tuple(f for f in SCREEN_FLAGS if f in by_rules | by_model)
    sources = {f: [name for name, got in (("rules", by_rules), ("model", by_model)) if f in got] for f in flags}
    emergency, crisis = "emergency" in flags, "crisis" in flags
    preface = "\n".join(line for line, on in ((EMERGENCY_LINE, emergency), (CRISIS_LINE, crisis)) if on)
    vetted = guidance.for_text(text, crisis=crisis) if emergency or crisis else ""
    return Screening(flags, preface, vetted, sources, probabilities)


def screen_question(question: str, use_model: bool = True) -> Screening:
    """Screen one user message. use_model=False: the rules alone (for comparison and for the rules' own tests)."""
    if not isinstance(question, str):
        raise ValueError(f"question must be a str, got {type(question).__name__}")
    return screen_texts([question], use_model)[0]


def screen_texts(texts: list[str], use_model: bool = True) -> list[Screening]:
    """screen_question for many texts, with one batched pass of the triage model."""
    if use_model and texts:
        from medassist.safety import triage

        model = triage.default()
        probabilities = model.probabilities(texts)
        by_model = [model.flags(p) for p in probabilities]
    else:
        probabilities, by_model = [{} for _ in texts], [set() for _ in texts]
    return [_screening(t, rule_flags(t), p, m) for t, p, m in zip(texts, probabilities, by_model)]


def conversation_turns(messages: list[dict]) -> list[str]:
    """The user turns a conversation is screened on: its latest CONVERSATION_TURNS, oldest first, so a red flag or a
    child's age said a turn or two ago still counts with the question asked now."""
    users = [m["content"] for m in messages if m.get("role") == "user" and isinstance(m.get("content"), str)]
    if not users:
        raise ValueError("a conversation to screen needs at least one user turn")
    return [u.strip() for u in users[-CONVERSATION_TURNS:]]


def screen_conversation(messages: list[dict], use_model: bool = True) -> Screening:
    """Screen a conversation at its last user turn: the last turn alone and together with the turns before it; a
    flag fires when either does (a follow-up that only makes sense with what was said before is still caught, and a
    new emergency in the last turn is never diluted by a long history)."""
    return screen_conversations([messages], use_model)[0]


def screen_conversations(conversations: list[list[dict]], use_model: bool = True) -> list[Screening]:
    """screen_conversation for many conversations (a single question: a one-turn one), one batched model pass."""
    turns = [conversation_turns(m) for m in conversations]
    texts = [t for u in turns for t in ([u[0]] if len(u) == 1 else [u[-1], "\n".join(u)])]
    screenings = iter(screen_texts(texts, use_model))
    return [next(screenings) if len(u) == 1 else _either("\n".join(u), next(screenings), next(screenings))
            for u in turns]


def _either(joined: str, alone: Screening, together: Screening) -> Screening:
    """The screening of a conversation from its last turn's and its joined turns': each flag from either."""
    flags = tuple(f for f in SCREEN_FLAGS if f in alone.flags or f in together.flags)
    sources = {f: sorted(set(alone.sources.get(f, [])) | set(together.sources.get(f, []))) for f in flags}
    probabilities = {k: max(alone.probabilities.get(k, 0.0), together.probabilities.get(k, 0.0))
                     for k in alone.probabilities}
    return _screening(joined, {f for f in flags if "rules" in sources[f]}, probabilities,
                      {f for f in flags if "model" in sources[f]})
