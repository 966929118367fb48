"""Vetted guidance for emergencies and crises, by kind (guidance.json, reviewed like the rules).

When the screen escalates, the reader gets the escalation line and then only this text: a small model's free text
after "call your emergency number" has told people to keep taking an overdose or to call their doctor instead."""
import json
import re
from functools import lru_cache
from pathlib import Path

from medassist.safety.text import normalise

GUIDANCE_FILE = Path(__file__).with_name("guidance.json")
MAX_KINDS = 2  # crisis + overdose, or choking + anaphylaxis: more than two paragraphs is not read in a hurry


@lru_cache(maxsize=1)
def kinds() -> tuple[dict, ...]:
    """The guidance entries in their order of precedence: {"kind", "when" (regexes), "text"}."""
    return tuple(json.loads(GUIDANCE_FILE.read_text(encoding="utf-8"))["kinds"])


def for_text(text: str, crisis: bool = False) -> str:
    """The guidance paragraphs for a message that was escalated: crisis first when it fired, then the first kinds
    whose patterns match, else the general 'while you wait' line."""
    q = normalise(text)
    chosen = [k for k in kinds() if k["kind"] == "crisis"] if crisis else []
    chosen += [k for k in kinds() if k["when"] and any(re.search(p, q) for p in k["when"])]
    if not chosen:
        chosen = [k for k in kinds() if k["kind"] == "emergency"]
    return "\n\n".join(k["text"] for k in chosen[:MAX_KINDS])
