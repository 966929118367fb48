"""`python -m medassist index build FILE.jsonl ... --out DIR`: a retrieval index of a trusted collection.

Input: JSONL question/answer pairs as fit reads them ({"instruction", "output"}, optional "source", "url", "focus";
MedQuAD's importer writes exactly these). Each answer is split into passages of at most --passage-words words, at
line and sentence ends, each headed by its question; BM25 (bm25s) indexes title and text. Written all or nothing;
building twice from the same files gives the same bytes. Searching is medassist/retrieval.py (the answer side).
"""
import argparse
import json
import re
from pathlib import Path

from medassist import UserError
from medassist.files import atomic_dir
from medassist.retrieval import FORMAT, INDEX_FILE, PASSAGES_FILE, LANGUAGE, tokenize

PASSAGE_WORDS = 160  # ~220 gemma tokens: one passage and a question fit a 384-token training example


def split_passages(text: str, words: int = PASSAGE_WORDS) -> list[str]:
    """`text` in pieces of at most `words` words, cut at line ends, else sentence ends, else between words."""
    units = [u for line in text.splitlines() for u in re.split(r"(?<=[.!?])\s+", line.strip()) if u]
    pieces, current = [], []
    for unit in units:
        for start in range(0, len(unit.split()), words):  # a single over-long sentence is cut between words
            chunk = " ".join(unit.split()[start : start + words])
            if current and len(" ".join(current).split()) + len(chunk.split()) > words:
                pieces.append(" ".join(current))
                current = []
            current.append(chunk)
    return pieces + ([" ".join(current)] if current else [])


def doc_of(record: dict, path: str | Path) -> str:
    """The document a pair comes from: its URL (MedQuAD: one page, many questions), else its file and topic."""
    return record.get("url") or f"{Path(path).name}:{record.get('focus') or record['instruction']}"


def passages_of(files: list[str], words: int = PASSAGE_WORDS) -> list[dict]:
    """Every passage of every pair in `files`, in file order. Bad lines: one UserError naming each file:line."""
    from medassist.data import read_records  # file:line validation, as fit does

    passages = []
    for path in files:
        for record in read_records(path):
            if "messages" in record:
                raise UserError(f"{path}: holds conversations; an index is built from question/answer pairs "
                                f"({{'instruction', 'output', 'source'?, 'url'?, 'focus'?}})")
            doc = doc_of(record, path)
            for text in split_passages(record["output"], words):
                passages.append({"title": record["instruction"].strip(), "text": text,
                                 "source": record.get("source") or Path(path).stem, "url": record.get("url") or "",
                                 "focus": record.get("focus") or "", "doc": doc})
    if not passages:
        raise UserError(f"no passages in {', '.join(files)}")
    return passages


def build(files: list[str], out: str | Path, words: int = PASSAGE_WORDS, threshold: float = 0.0,
          overwrite: bool = False) -> dict:
    """Write the index of `files` to `out`; returns its medassist-index.json content."""
    import bm25s

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} already exists and is not empty; pass --overwrite to replace it, or another --out")
    passages = passages_of(files, words)
    bm25 = bm25s.BM25()
    bm25.index(tokenize([f"{p['title']} {p['focus']} {p['text']}" for p in passages]), show_progress=False)
    per_doc: dict[str, int] = {}
    for p in passages:
        per_doc[p["doc"]] = per_doc.get(p["doc"], 0) + 1
    meta = {"format": FORMAT, "files": [str(f) for f in files], "passages": len(passages), "documents": len(per_doc),
            "max_passages_per_doc": max(per_doc.values()), "passage_words": words, "language": LANGUAGE,
            "threshold": threshold}
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
    b.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    if args.passage_words < 20:
        raise UserError(f"--passage-words must be at least 20, got {args.passage_words}")
    meta = build(args.files, args.out, args.passage_words, args.threshold, args.overwrite)
    print(f"wrote {args.out}: {meta['passages']} passages from {meta['documents']} documents")
    return 0
