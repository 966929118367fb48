"""Duplicates and overlap of instruction records (pairs and conversations): what the checker lists
(`python -m medassist.data check`) and what `fit` warns about before training. Plain functions on records; no
tokenizer, no Lightning."""

import re
import unicodedata
from itertools import combinations

from medassist.records import messages_of

NEAR = "equal after Unicode NFKC, lower-casing, and dropping punctuation and extra whitespace"


def normalise(text: str) -> str:
    """What two texts must share to count as near duplicates: letters and digits, case-folded, single-spaced."""
    return " ".join(re.sub(r"[\W_]+", " ", unicodedata.normalize("NFKC", text).casefold()).split())


def question_key(record: dict) -> str:
    """Everything said before the last answer (a pair's question, a conversation's turns up to its last)."""
    return normalise(" ".join(m["content"] for m in messages_of(record)[:-1]))


def pair_key(record: dict) -> tuple[str, str]:
    return question_key(record), normalise(messages_of(record)[-1]["content"])


def duplicates(records: list[dict]) -> list[tuple[int, int]]:
    """(index, index of its first copy) for every record whose question and answer repeat an earlier one."""
    first, out = {}, []
    for i, record in enumerate(records):
        j = first.setdefault(pair_key(record), i)
        if j != i:
            out.append((i, j))
    return out


def overlap(reference: list[dict], other: list[dict]) -> tuple[list[int], list[int]]:
    """Indices in `other` of (pairs found in `reference`, questions found there with another answer)."""
    pairs = {pair_key(r) for r in reference}
    questions = {key for key, _ in pairs}
    keys = [pair_key(r) for r in other]
    return [i for i, k in enumerate(keys) if k in pairs], [i for i, k in enumerate(keys)
                                                          if k not in pairs and k[0] in questions]


def cross_file_warnings(files: dict[str, list[dict]]) -> list[str]:
    """Duplicates inside each file and pairs shared between files: the checks `fit` runs before training."""
    hint = "; `python -m medassist.data check FILE...` lists their lines"
    out = [f"{name}: {len(d)} duplicate pair(s) ({NEAR}){hint}" for name, recs in files.items()
           if (d := duplicates(recs))]
    for (a, ra), (b, rb) in combinations(files.items(), 2):
        if shared := overlap(ra, rb)[0]:
            out.append(f"{b}: {len(shared)} pair(s) also in {a}: its metrics are inflated by memorised answers{hint}")
    return out
