"""`python -m medassist index build FILE.jsonl ... --out DIR`: a retrieval index of a trusted collection.

Input: JSONL question/answer pairs as fit reads them ({"instruction", "output"}, optional "source", "url", "focus";
MedQuAD's importer writes exactly these; conversation lines are skipped). Each answer is split into passages of at
most --passage-words words (whole sentences packed in order; a longer sentence is cut between words), each headed
by its question; BM25 (bm25s) indexes title, topic and text. Written all or nothing; building twice from the same
files gives the same bytes. Searching is medassist/retrieval.py (the answer side).
"""
import argparse
import json
from collections import Counter
from pathlib import Path

from medassist import UserError
from medassist.files import atomic_dir
from medassist.retrieval import FORMAT, INDEX_FILE, LANGUAGE, PASSAGES_FILE, SENTENCE_END, doc_of, tokenize

PASSAGE_WORDS = 160  # ~220 gemma tokens: one passage and a question fit a 384-token training example


def split_passages(text: str, words: int = PASSAGE_WORDS) -> list[str]:
    """`text` in pieces of at most `words` words: its sentences (and lines) packed in order, a sentence longer than
    `words` cut between words."""
    units = [u.split() for line in text.splitlines() for u in SENTENCE_END.split(line.strip()) if u]
    pieces, current = [], []  # current: the words of the piece being filled
    for unit in units:
        for start in range(0, len(unit), words):  # a single over-long sentence is cut between words
            chunk = unit[start : start + words]
            if current and len(current) + len(chunk) > words:
                pieces.append(" ".join(current))
                current = []
            current += chunk
    return pieces + ([" ".join(current)] if current else [])


def passages_of(files: list[str], words: int = PASSAGE_WORDS) -> tuple[list[dict], int]:
    """(every passage of every pair in `files`, in file order; conversations skipped). Bad lines: one UserError
    naming each file:line."""
    from medassist.data import read_records  # file:line validation, as fit does

    passages, skipped = [], 0
    for path in files:
        for record in read_records(path):
            if "messages" in record:  # a conversation is not a reference text (the bundled data mixes both)
                skipped += 1
                continue
            doc = doc_of(record, path)
            for text in split_passages(record["output"], words):
                passages.append({"title": record["instruction"].strip(), "text": text,
                                 "source": record.get("source") or Path(path).stem, "url": record.get("url") or "",
                                 "focus": record.get("focus") or "", "doc": doc})
    if not passages:
        raise UserError(f"no question/answer pairs in {', '.join(files)}; an index is built from "
                        f"{{'instruction', 'output', 'source'?, 'url'?, 'focus'?}} lines (conversations are skipped)")
    return passages, skipped


KEEP = 0.95  # --calibrate: the threshold keeps this share of the questions whose best passage is their own document


def calibrated(bm25, passages: list[dict], path: str) -> tuple[float, dict]:
    """The threshold that keeps KEEP of `path`'s questions (in the collection) whose best passage is from their own
    document: below it, a match is weaker than almost all right ones, so no source is shown."""
    from medassist.data import read_records

    records = [r for r in read_records(path) if "messages" not in r]
    if not records:
        raise UserError(f"--calibrate {path}: no question/answer pairs to calibrate with (conversations are skipped)")
    ids, scores = bm25.retrieve(tokenize([r["instruction"] for r in records]), k=1, show_progress=False)
    right = sorted(float(s[0]) for r, i, s in zip(records, ids, scores)
                   if passages[int(i[0])]["doc"] == doc_of(r, path))
    if not right:
        raise UserError(f"--calibrate {path}: no question found its own document; calibrate with questions whose "
                        f"documents are in the index (e.g. its validation file)")
    threshold = round(right[int((1 - KEEP) * len(right))], 4)
    return threshold, {"calibrated_on": str(path), "questions": len(records), "top1_right": len(right), "keeps": KEEP}


def _sorted_vocab(docs: list[list[str]]):
    """The tokenized corpus with its vocabulary in sorted order. Given plain token lists, bm25s numbers the words in
    the order of a Python set, which changes with the hash seed of each process, so two builds of the same files
    wrote different bytes (the same search results, other files)."""
    from bm25s.tokenization import Tokenized

    vocab = {word: i for i, word in enumerate(sorted({w for doc in docs for w in doc}))}
    return Tokenized(ids=[[vocab[w] for w in doc] for doc in docs], vocab=vocab)


def build(files: list[str], out: str | Path, words: int = PASSAGE_WORDS, threshold: float = 0.0,
          overwrite: bool = False, calibrate: str | None = None) -> dict:
    """Write the index of `files` to `out`; returns its medassist-index.json content. `calibrate`: a file of
    questions whose documents are in `files` sets the threshold (`calibrated`) instead of `threshold`."""
    import bm25s

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} already exists and is not empty; pass --overwrite to replace it, or another --out")
    passages, skipped = passages_of(files, words)
    bm25 = bm25s.BM25()
    bm25.index(_sorted_vocab(tokenize([f"{p['title']} {p['focus']} {p['text']}" for p in passages])),
               show_progress=False)
    calibration = {}
    if calibrate:
        threshold, calibration = calibrated(bm25, passages, calibrate)
    per_doc = Counter(p["doc"] for p in passages)
    meta = {"format": FORMAT, "files": [str(f) for f in files], "passages": len(passages), "documents": len(per_doc),
            "max_passages_per_doc": max(per_doc.values()), "passage_words": words, "language": LANGUAGE,
            "threshold": threshold, **({"calibration": calibration} if calibration else {}),
            "conversations_skipped": skipped}
    with atomic_dir(out) as tmp:
        bm25.save(str(tmp), show_progress=False)
        with open(tmp / PASSAGES_FILE, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in passages)
        (tmp / INDEX_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m medassist index", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="index JSONL question/answer pairs")
    b.add_argument("files", nargs="+")
    b.add_argument("--out", required=True, help="the index directory (replaced only with --overwrite)")
    b.add_argument("--passage-words", type=int, default=PASSAGE_WORDS)
    b.add_argument("--threshold", type=float, default=0.0,
                   help="BM25 score below which a passage is not used (0: always use the best one)")
    b.add_argument("--calibrate", metavar="QUESTIONS.jsonl",
                   help="set the threshold from these questions (their documents in the index, e.g. the validation "
                        f"file): the score that keeps {KEEP:.0%} of those that find their own document")
    b.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    if args.passage_words < 20:
        raise UserError(f"--passage-words must be at least 20, got {args.passage_words}")
    meta = build(args.files, args.out, args.passage_words, args.threshold, args.overwrite, args.calibrate)
    print(f"wrote {args.out}: {meta['passages']} passages from {meta['documents']} documents"
          + (f" ({meta['conversations_skipped']} conversations skipped)" if meta["conversations_skipped"] else "")
          + f"; threshold {meta['threshold']}" + (f" (from {args.calibrate}: {meta['calibration']['top1_right']} of "
                                                  f"{meta['calibration']['questions']} questions found their own "
                                                  f"document)" if args.calibrate else ""))
    return 0
