"""Data preparation: importers (MedQuAD XML, Alpaca-style JSON/JSONL, PubMedQA, ShareGPT conversations) and the
checker.

    python -m medassist.data import medquad path/to/MedQuAD --out data/medquad/
    python -m medassist.data import alpaca HealthCareMagic-100k.json --out data/chatdoctor/ [--input-field input]
    python -m medassist.data import pubmedqa ori_pqal.json --out data/pubmedqa/ [--no-context]
    python -m medassist.data import sharegpt chats.json --out data/chats/    # -> {"messages": [...]} lines
    python -m medassist.data check data/medquad/*.jsonl [--base-model embedded] [--max-seq-length 384]

Importers write train/validation/test.jsonl split by topic, seeded, without duplicates; nothing is written unless
the whole source parsed. The checker lists bad lines, duplicates, overlap between files and token lengths.
"""

import argparse
import json
import random
import sys
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from itertools import combinations
from pathlib import Path

from medassist import UserError
from medassist.checks import NEAR, duplicates, normalise, overlap, pair_key, question_key
from medassist.data import MAX_ERRORS, check_messages, collect_records, listed, messages_of, tokenize_example
from medassist.files import atomic_dir

SPLITS = ("train", "validation", "test")


# ---- importers: each returns [(topic, record)] and {reason for skipping: count} ---------------------------------
def record(instruction, output, source, qtype="", focus="", url="", id="", input="", **extra) -> dict:
    return {"instruction": instruction, "input": input, "output": output, "source": source, "qtype": qtype,
            "focus": focus, "url": url, "id": id, **extra}


def clean_answer(text: str) -> str:
    # MedQuAD indents paragraphs, separates them with blank lines and doubles spaces after full stops: keep one
    # newline between paragraphs and single spaces (as ../shared/data/medquad has them).
    return "\n".join(" ".join(line.split()) for line in text.splitlines() if line.strip())


def import_medquad(source: Path, **_) -> tuple[list, Counter]:
    """MedQuAD's top directory (numbered subset folders of XML files) or one subset folder; topic = the focus."""
    if not source.is_dir():
        raise UserError(f"{source}: not a directory; give MedQuAD's top directory (git clone "
                        f"https://github.com/abachaa/MedQuAD) or one subset folder such as 9_CDC_QA")
    files = sorted(source.glob("*.xml")) or sorted(source.glob("*/*.xml"))
    if not files:
        raise UserError(f"{source}: no .xml files in it or in its subfolders; give MedQuAD's top directory "
                        f"or a subset folder such as 9_CDC_QA")
    pairs, skipped, errors = [], Counter(), []
    for file in files:
        try:
            doc = ET.parse(file).getroot()
        except ET.ParseError as e:
            errors.append(f"{file}:{e.position[0]}: malformed XML ({e}); re-download or delete the file")
            continue
        meta = dict(source=doc.get("source", file.parent.name), url=doc.get("url", ""),
                    focus=(doc.findtext("Focus") or "").strip())
        topic = normalise(meta["focus"]) or f"{meta['source']}/{doc.get('id')}"
        for pair in doc.iter("QAPair"):
            question, answer = pair.find("Question"), clean_answer(pair.findtext("Answer") or "")
            if question is None or not (question.text or "").strip():
                skipped[f"no question ({meta['source']})"] += 1
            elif not answer:  # three subsets ship without answers (MedlinePlus copyright)
                skipped[f"no answer ({meta['source']})"] += 1
            else:
                pairs.append((topic, record(" ".join(question.text.split()), answer, qtype=question.get("qtype", ""),
                                            id=question.get("qid", ""), **meta)))
    _raise_all(errors, source)
    return pairs, skipped


def import_alpaca(source: Path, instruction_field="instruction", input_field="input", output_field="output",
                  **_) -> tuple[list, Counter]:
    """Alpaca-style JSON (a list of objects) or JSONL, field names configurable; topic = the question + input."""
    pairs, skipped, errors = [], Counter(), []
    fields = {"instruction": instruction_field, "output": output_field, "input": input_field}
    for n, (where, item) in enumerate(_json_items(source), start=1):
        if not isinstance(item, dict):
            errors.append(f"{where}: expected a JSON object, got {type(item).__name__}")
            continue
        values = {}
        for name, field in fields.items():
            value = item.get(field, "" if name == "input" else None) if field else ""
            if value is None:
                errors.append(f"{where}: no '{field}' field (it has {sorted(item)[:8]}); name the {name} field "
                              f"with --{name}-field")
            elif not isinstance(value, str):
                errors.append(f"{where}: '{field}' must be a string, got {type(value).__name__}")
            values[name] = value.strip() if isinstance(value, str) else ""
        if not values["instruction"] or not values["output"]:
            skipped["empty question or answer"] += 1
            continue
        r = record(values["instruction"], values["output"], source.stem, input=values["input"], id=f"{source.stem}-{n}")
        pairs.append((question_key(r), r))
    _raise_all(errors, source)
    return pairs, skipped


def import_pubmedqa(source: Path, context=True, **_) -> tuple[list, Counter]:
    """PubMedQA's labelled ori_pqal.json. The answer is "Yes." / "No." / "Maybe." + the abstract's conclusion (the
    model learns to commit to a verdict), the verdict is also kept as `decision`; the abstract goes in `input`
    unless context=False (a conclusion without its study invites invented findings). Topic = the article."""
    text = _read_text(source)
    data, pairs, errors = _parse_json(text, source), [], []
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a JSON object of PMID -> {{QUESTION, CONTEXTS, LONG_ANSWER, "
                        f"final_decision}} (PubMedQA's ori_pqal.json), got a {type(data).__name__}")
    need = {"QUESTION": str, "LONG_ANSWER": str, "final_decision": str, "CONTEXTS": list}
    for pmid, item in data.items():
        bad = [k for k, kind in need.items() if not isinstance(item, dict) or not isinstance(item.get(k), kind)]
        decision = None if bad else item["final_decision"]
        if bad or decision not in ("yes", "no", "maybe"):
            line = text.count("\n", 0, max(0, text.find(json.dumps(pmid)))) + 1  # json keeps no positions
            errors.append(f"{source}:{line}: entry {pmid} needs QUESTION, LONG_ANSWER, CONTEXTS and final_decision "
                          f"yes/no/maybe ({', '.join(bad) or 'final_decision=' + repr(decision)} wrong or missing)")
            continue
        answer = f"{decision.capitalize()}. {item['LONG_ANSWER'].strip()}"
        pairs.append((pmid, record(item["QUESTION"].strip(), answer, "PubMedQA", qtype="yes/no/maybe",
                                   focus=", ".join(str(m) for m in (item.get("MESHES") or [])[:3]),
                                   url=f"https://pubmed.ncbi.nlm.nih.gov/{pmid}/", id=pmid, decision=decision,
                                   input="\n".join(map(str, item["CONTEXTS"])) if context else "")))
    _raise_all(errors, source)
    return pairs, Counter()


# ShareGPT's speaker names (FastChat, Axolotl and LLaMA-Factory read the same) -> OpenAI roles.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                  "system": "system"}


def import_sharegpt(source: Path, **_) -> tuple[list, Counter]:
    """ShareGPT JSON (a list) or JSONL of {"conversations": [{"from": "human"|"gpt"|"system", "value": ...}]} ->
    {"messages": [...]} records; a last human turn nobody answered is dropped (counted). Topic = the first turn."""
    pairs, skipped, errors = [], Counter(), []
    for n, (where, item) in enumerate(_json_items(source), start=1):
        turns = item.get("conversations") if isinstance(item, dict) else None
        if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
            errors.append(f"{where}: expected an object with 'conversations': a list of {{'from', 'value'}} turns")
            continue
        unknown = sorted({str(t.get("from")) for t in turns} - set(SHAREGPT_ROLES))
        if unknown:
            errors.append(f"{where}: unknown speaker(s) {', '.join(unknown)} in 'from'; expected one of "
                          f"{', '.join(SHAREGPT_ROLES)}")
            continue
        messages = [{"role": SHAREGPT_ROLES[t["from"]], "content": t.get("value")} for t in turns]
        if len(messages) > 1 and messages[-1]["role"] == "user":
            messages.pop()
            skipped["last human turn without an answer (dropped)"] += 1
        if problem := check_messages(messages, last="assistant"):
            errors.append(f"{where}: {problem}")
            continue
        r = {"messages": messages, "source": source.stem, "id": item.get("id", f"{source.stem}-{n}")}
        pairs.append((normalise(next(m["content"] for m in messages if m["role"] == "user")), r))
    _raise_all(errors, source)
    return pairs, skipped


IMPORTERS = {"medquad": import_medquad, "alpaca": import_alpaca, "pubmedqa": import_pubmedqa,
             "sharegpt": import_sharegpt}


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start}); save the file as UTF-8") from None


def _parse_json(text: str, path: Path, line_no: int | None = None):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{line_no or e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None


def _json_items(path: Path) -> list[tuple[str, object]]:
    """(where, item) of a JSON list (where = "file: item N") or of JSONL (where = "file:line")."""
    text = _read_text(path)
    if path.suffix != ".jsonl" and text.lstrip()[:1] == "[":
        return [(f"{path}: item {i}", item) for i, item in enumerate(_parse_json(text, path), start=1)]
    items, errors = [], []
    for n, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                items.append((f"{path}:{n}", _parse_json(line, path, n)))
            except UserError as e:
                errors.append(f"{e}; give a JSON list of objects or JSONL (one object per line)")
    _raise_all(errors, path)
    return items


def _raise_all(errors: list[str], source) -> None:
    if errors:
        raise UserError(f"{len(errors)} problem(s) in {source}; nothing was written:\n" + listed(errors))


# ---- import: deduplicate, split by topic, write atomically ------------------------------------------------------
def deduplicate(pairs: list) -> tuple[list, int, int]:
    """(pairs without repeats, exact copies dropped, near copies dropped); the first copy is kept."""
    seen, exact, kept, n_exact, n_near = set(), set(), [], 0, 0
    for topic, r in pairs:
        raw = json.dumps(messages_of(r))
        if raw in exact:
            n_exact += 1
        elif pair_key(r) in seen:
            n_near += 1
        else:
            kept.append((topic, r))
        exact.add(raw)
        seen.add(pair_key(r))
    return kept, n_exact, n_near


def split_by_topic(pairs: list, val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[dict]]:
    """Whole topics to test, then validation, until each holds its fraction of the examples; the rest train.

    Topics are shuffled with `seed` (sorted first, so the result depends on nothing else); each split keeps that
    shuffled topic order, so the first N lines of a validation file are a sample of topics, not one source.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise UserError(f"--val-fraction {val_fraction} and --test-fraction {test_fraction} must be in [0, 1) "
                        f"and leave something to train on")
    topics = defaultdict(list)
    for topic, r in pairs:
        topics[topic].append(r)
    order = sorted(topics)
    random.Random(seed).shuffle(order)
    splits, goals = {name: [] for name in SPLITS}, {"test": test_fraction * len(pairs),
                                                   "validation": val_fraction * len(pairs)}
    for topic in order:
        name = next((s for s in ("test", "validation") if len(splits[s]) < goals[s]), "train")
        splits[name] += topics[topic]
    if not splits["train"]:
        raise UserError(f"only {len(topics)} topic(s): nothing left to train on; lower --val-fraction/--test-fraction")
    return splits


def write_splits(out: Path, splits: dict[str, list[dict]], summary: dict, overwrite: bool = False) -> None:
    """train/validation/test.jsonl (empty splits omitted) + import.json, all or nothing (temp dir, then rename)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise UserError(f"{out} already exists and is not empty; pass --overwrite to replace it, or another --out")
    with atomic_dir(out) as tmp:
        for name, records in splits.items():
            if records:
                with open(tmp / f"{name}.jsonl", "w", encoding="utf-8") as f:
                    f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        (tmp / "import.json").write_text(json.dumps(summary, indent=2) + "\n")


def run_import(args) -> None:
    source = Path(args.source)
    if not source.exists():
        raise UserError(f"{source}: not found; give the {args.format} source (`python -m medassist.data import -h`)")
    pairs, skipped = IMPORTERS[args.format](source, instruction_field=args.instruction_field,
                                            input_field=args.input_field, output_field=args.output_field,
                                            context=not args.no_context)
    if not pairs:
        raise UserError(f"{source}: no question-answer pairs or conversations with an answer; nothing was written")
    kept, n_exact, n_near = deduplicate(pairs)
    splits = split_by_topic(kept, args.val_fraction, args.test_fraction, args.seed)
    topic_of = {id(r): topic for topic, r in kept}
    topics = {name: len({topic_of[id(r)] for r in recs}) for name, recs in splits.items()}
    summary = {"format": args.format, "source": str(source), "seed": args.seed, "val_fraction": args.val_fraction,
               "test_fraction": args.test_fraction, "read": len(pairs) + sum(skipped.values()),
               "skipped": dict(skipped), "duplicates": {"exact": n_exact, "near": n_near, "near_means": NEAR},
               "examples": {name: len(recs) for name, recs in splits.items()}}
    write_splits(Path(args.out), splits, summary, args.overwrite)
    print(f"{args.format}: read {summary['read']} pairs from {source}")
    for reason, n in sorted(skipped.items()):
        print(f"  skipped {n}: {reason}")
    print(f"  duplicates dropped: {n_exact} exact, {n_near} near ({NEAR})")
    print(f"wrote {args.out}: " + ", ".join(f"{name} {len(recs)} ({topics[name]} topics)"
                                            for name, recs in splits.items() if recs))


# ---- check --------------------------------------------------------------------------------------------------------
def token_lengths(tokenizer, records: list[dict]) -> list[int]:
    """Full length of each example as training tokenizes it (prompt + answer + end of turn), before truncation."""
    return [len(tokenize_example(tokenizer, r, max_seq_length=1 << 30)["input_ids"]) for r in records]


def run_check(args) -> int:
    """Print a report per file; 2 if any file has bad lines (or, with --strict, duplicates or overlap), else 0."""
    tokenizer = None
    if args.base_model != "none":
        from medassist.loading import load_tokenizer

        tokenizer = load_tokenizer(args.base_model)
    files, failed = {}, False
    for path in args.files:
        numbered, problems = collect_records(path)
        lines, records = [n for n, _ in numbered], [r for _, r in numbered]
        files[path] = (lines, records)
        dups = duplicates(records)
        failed |= bool(problems) or (args.strict and bool(dups))
        print(f"{path}: {len(records)} examples, {len(problems)} bad line(s), {len(dups)} duplicate(s) ({NEAR})")
        for problem in problems[:MAX_ERRORS]:
            print(f"  error: {problem}")
        for i, j in dups[:MAX_ERRORS]:
            print(f"  duplicate: {path}:{lines[i]} repeats line {lines[j]}")
        if tokenizer is not None and records:
            lengths = sorted(token_lengths(tokenizer, records))
            pct = "  ".join(f"p{p} {lengths[min(len(lengths) - 1, len(lengths) * p // 100)]}" for p in (50, 90, 95, 99))
            over = sum(n > args.max_seq_length for n in lengths)
            print(f"  tokens: {pct}  max {lengths[-1]}; {over} ({100 * over / len(lengths):.1f}%) longer than "
                  f"max_seq_length={args.max_seq_length} (shortened: a conversation's oldest exchanges first, then the "
                  f"question, then the answer's tail)")
    for (a, (_, ra)), (b, (lb, rb)) in combinations(files.items(), 2):
        pairs, questions = overlap(ra, rb)
        failed |= args.strict and bool(pairs)
        print(f"{b} vs {a}: {len(pairs)} shared pair(s), {len(questions)} shared question(s) with another answer")
        for i in pairs[:MAX_ERRORS]:
            print(f"  overlap: {b}:{lb[i]} is also in {a}")
    return 2 if failed else 0


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m medassist.data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="convert a data set to train/validation/test.jsonl, split by topic")
    imp.add_argument("format", choices=sorted(IMPORTERS))
    imp.add_argument("source", help="medquad: the repository or a subset folder; alpaca, sharegpt: .json/.jsonl; "
                                    "pubmedqa: ori_pqal.json")
    imp.add_argument("--out", required=True, help="output directory (replaced only with --overwrite)")
    imp.add_argument("--overwrite", action="store_true")
    imp.add_argument("--seed", type=int, default=42)
    imp.add_argument("--val-fraction", type=float, default=0.05)
    imp.add_argument("--test-fraction", type=float, default=0.05)
    imp.add_argument("--instruction-field", default="instruction", help="alpaca: the question's field")
    imp.add_argument("--input-field", default="input", help="alpaca: optional context field ('' for none)")
    imp.add_argument("--output-field", default="output", help="alpaca: the answer's field")
    imp.add_argument("--no-context", action="store_true", help="pubmedqa: leave the abstract out of 'input'")
    chk = sub.add_parser("check", help="report bad lines, duplicates, overlap and token lengths")
    chk.add_argument("files", nargs="+")
    chk.add_argument("--base-model", default="embedded", help="whose tokenizer measures lengths ('none': skip)")
    chk.add_argument("--max-seq-length", type=int, default=384)
    chk.add_argument("--strict", action="store_true", help="duplicates and overlap between files are errors too")
    args = p.parse_args(argv)
    try:
        sys.exit(run_check(args) if args.command == "check" else run_import(args))
    except UserError as e:
        print(e.line(args.command), file=sys.stderr)
        sys.exit(2)
