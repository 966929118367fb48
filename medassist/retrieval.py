"""Retrieval from a trusted collection: a BM25 index (bm25s) of passages with their title, source and URL.

`python -m medassist index build FILE.jsonl ... --out DIR` writes an index (medassist/index.py); `load(DIR)` reads
it back in well under a second, and `Index.search(questions)` returns, per question, the best passages with their
BM25 scores. The answer path (generate.py, the server) puts the passages above the threshold into the prompt through
`prompts.context_text` and names them in the record as `sources`. No torch, no Lightning.
"""
import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

from medassist import UserError
from medassist.prompts import context_text, join_input

INDEX_FILE = "medassist-index.json"  # beside bm25s' own files: format, passages' origin, settings
PASSAGES_FILE = "passages.jsonl"
FORMAT = 1
# Questions and passages are tokenized the same way: lower-cased words of 2+ letters, English stop words out, Snowball
# stems (PyStemmer), so "symptoms" finds "symptom".
LANGUAGE = "english"
# Where a sentence ends, for passages and answers alike: after . ! or ? and the space that follows.
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
# BM25 finds the right document but often another of its questions first ("What is X?" for "What are the symptoms
# of X?"). The best few are re-ranked by how much of the question their heading question shares (word-set Jaccard,
# stems): question-to-question similarity, as the MedQuAD paper retrieves by question entailment. Chosen on 2,000
# MedQuAD training questions (not validation): a passage of the question's own answer first 52.6% -> 85.9%.
CANDIDATES = 10
TITLE_WEIGHT = 16.0  # BM25 points per unit of Jaccard: a tie-breaker BM25 scores (6-30 on MedQuAD) cannot swamp


@functools.cache
def _stemmer():
    import Stemmer

    return Stemmer.Stemmer(LANGUAGE)  # built once: every search (every server request) tokenizes its question


def tokenize(texts: list[str]) -> list[list[str]]:
    import bm25s

    return bm25s.tokenize(texts, stopwords=LANGUAGE, stemmer=_stemmer(), return_ids=False, show_progress=False)


@functools.lru_cache(maxsize=65536)
def _words(text: str) -> frozenset:
    return frozenset(tokenize([text])[0])


def title_match(question: str, title: str) -> float:
    """The share of stemmed words the question and a passage's heading question have in common (Jaccard)."""
    q, t = _words(question), _words(title)
    return len(q & t) / len(q | t) if q | t else 0.0


def doc_of(record: dict, path: str | Path) -> str:
    """The document a record comes from: its URL (MedQuAD: one page, many questions), else its file and topic (or
    first question)."""
    first = record.get("instruction") or next((m["content"] for m in record.get("messages", []) if m["role"] == "user"),
                                              "")
    return record.get("url") or f"{Path(path).name}:{record.get('focus') or first}"


@dataclass
class Index:
    """A loaded index: `passages[i]` is {"title", "text", "source", "url", "focus", "doc"}; `threshold` the BM25
    score below which a passage is not used (saved with the index, chosen on validation questions)."""

    bm25: object
    passages: list[dict]
    meta: dict

    @property
    def threshold(self) -> float:
        return float(self.meta.get("threshold", 0.0))

    def search(self, questions: list[str], k: int = 3, exclude_docs: list[str | None] | None = None,
               min_score: float = 0.0) -> list[list[dict]]:
        """The best `k` passages for each question, best first, each with its "score"; `exclude_docs[i]` leaves one
        document out for question i (grounded training: learn to answer from a passage that is only related); only
        passages scoring at least `min_score` are kept (before re-ranking, so a weak one is never moved up)."""
        if not questions:
            return []
        k = min(k, len(self.passages))
        extra = max(k, CANDIDATES) + (max(self.meta.get("max_passages_per_doc", 1), 1) if exclude_docs else 0)
        ids, scores = self.bm25.retrieve(tokenize(questions), k=min(extra, len(self.passages)), show_progress=False)
        out = []
        for n, (row, row_scores) in enumerate(zip(ids, scores)):
            skip = exclude_docs[n] if exclude_docs else None
            hits = [{**self.passages[int(i)], "score": round(float(s), 4)} for i, s in zip(row, row_scores)
                    if float(s) > 0 and float(s) >= min_score
                    and (skip is None or self.passages[int(i)]["doc"] != skip)]
            # "score" stays BM25's (the threshold is on it); the order adds the heading's match (CANDIDATES)
            hits.sort(key=lambda h: -(h["score"] + TITLE_WEIGHT * title_match(questions[n], h["title"])))
            out.append(hits[:k])
        return out

    def relevant(self, questions: list[str], k: int = 1,
                 exclude_docs: list[str | None] | None = None) -> list[list[dict]]:
        """`search`, keeping only passages at or above the index's threshold (possibly none)."""
        return self.search(questions, k, exclude_docs, min_score=self.threshold)


def load(directory: str | Path) -> Index:
    """An index written by `python -m medassist index build`; a clear error for anything else."""
    import bm25s

    directory = Path(directory)
    meta_file = directory / INDEX_FILE
    if not meta_file.is_file():
        raise UserError(f"{directory}: not a medassist index (no {INDEX_FILE}); build one with `python -m medassist "
                        f"index build FILE.jsonl --out {directory}`")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT:
        raise UserError(f"{directory}: index format {meta.get('format')}, this medassist reads {FORMAT}; rebuild it "
                        f"with `python -m medassist index build ... --out {directory} --overwrite`")
    passages = [json.loads(line) for line in (directory / PASSAGES_FILE).read_text(encoding="utf-8").splitlines()]
    bm25 = bm25s.BM25.load(str(directory), show_progress=False)
    return Index(bm25, passages, meta)


def source_of(hit: dict) -> dict:
    """What an answer record names of a passage it used."""
    return {k: hit[k] for k in ("title", "source", "url", "score")}


def query_of(messages: list[dict]) -> str:
    """The last two user turns of a conversation: what a follow-up such as "and in children?" retrieves with when
    it finds nothing alone (it names its topic only in the turn before)."""
    users = [m["content"] for m in messages if m["role"] == "user"]
    return " ".join(users[-2:])


def relevant_passages(index: Index, conversations: list[list[dict]], k: int = 1) -> list[list[dict]]:
    """The relevant passages for each conversation's last question: searched with the question alone first (a new
    topic wins over the one before), then, where that finds nothing, with the user turn before it (`query_of`)."""
    found = index.relevant([c[-1]["content"] for c in conversations], k)
    weak = [n for n, hits in enumerate(found) if not hits and len(conversations[n]) > 1]
    for n, hits in zip(weak, index.relevant([query_of(conversations[n]) for n in weak], k)):
        found[n] = hits
    return found


def ground(index: Index | None, conversations: list[list[dict]], k: int = 1) -> list[tuple[list[dict], list | None]]:
    """(conversation with the relevant passages in its last user turn, their sources) for each conversation;
    sources None without an index (`relevant_passages`). The passages go through `prompts.context_text`, the
    template's input part."""
    if index is None:
        return [(c, None) for c in conversations]
    out = []
    for messages, hits in zip(conversations, relevant_passages(index, conversations, k)):
        if hits:
            last = {"role": "user", "content": join_input(messages[-1]["content"], context_text(hits))}
            messages = messages[:-1] + [last]
        out.append((messages, [source_of(h) for h in hits]))
    return out
