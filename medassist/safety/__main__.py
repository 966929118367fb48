"""python -m medassist.safety <screen|evaluate|train>

  screen   --input questions.jsonl      one JSON line per question: flags, which layer fired, probabilities
  evaluate --data FILE.jsonl [--kind questions|guard|conversations] [--rules-only] [--json]
  train    [--task triage|guard] [--train DIR_OR_FILE ...] [--dev FILE ...] [--out DIR] [--seed N] [--members N]
                                        retrain
  latency  --data FILE.jsonl [--repeats N]  median screening time of one question, once the model is loaded
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from medassist import UserError

def _predict(rows: list[dict], kind: str, use_model: bool) -> list[set[str]]:
    from medassist import safety

    if kind == "guard":
        from medassist.safety.guard import rule_sentence_flags, sentence_flags

        check = sentence_flags if use_model else rule_sentence_flags
        return [set(check(row["text"])) for row in rows]
    if kind == "conversations":
        return [set(safety.screen_conversation(row["messages"], use_model).flags) for row in rows]
    return [set(s.flags) for s in safety.screen_texts([row["text"] for row in rows], use_model)]


def evaluate(path: Path, kind: str, use_model: bool = True) -> dict:
    """The score() report of rules+model (or the rules alone) on one labelled file, with screening latency."""
    from medassist.safety.labelled import read_labelled, score
    from medassist.safety.lines import GUARD_FLAGS, SCREEN_FLAGS

    rows = read_labelled(path, kind)
    start = time.perf_counter()
    predicted = _predict(rows, kind, use_model)
    report = score(rows, predicted, GUARD_FLAGS if kind == "guard" else SCREEN_FLAGS)
    report["n"], report["seconds"] = len(rows), round(time.perf_counter() - start, 2)
    if kind == "guard":  # a kept sentence that was removed: over-removal
        kept = [r for r, p in zip(rows, predicted) if not r["labels"]]
        report["over_removed"] = [r["text"] for r, p in zip(rows, predicted) if not r["labels"] and p]
        report["negatives"]["false_alarm_rate"] = len(report["over_removed"]) / len(kept) if kept else None
    return report


def latency(questions: list[str], repeats: int = 1) -> dict:
    """Median and 90th percentile of screen_question on one question at a time, once the model is loaded."""
    import platform

    import torch

    from medassist import safety

    load = time.perf_counter()
    safety.screen_question("warm-up")
    load = time.perf_counter() - load
    times = []
    for _ in range(repeats):
        for q in questions:
            start = time.perf_counter()
            safety.screen_question(q)
            times.append(time.perf_counter() - start)
    times.sort()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return {"n": len(times), "median_ms": round(1000 * statistics.median(times), 1),
            "p90_ms": round(1000 * times[int(0.9 * (len(times) - 1))], 1), "load_s": round(load, 2),
            "threads": torch.get_num_threads(), "cpu": cpu}


def screen(path: Path) -> int:
    from medassist import safety
    from medassist.records import as_messages, read_questions

    items = read_questions(path)
    bad = 0
    for item in items:
        if "error" in item:
            print(json.dumps({"line": item["line"], "error": item["error"]}), flush=True)
            bad += 1
            continue
        s = safety.screen_conversation(as_messages(item["question"]))  # a question or a conversation ending with one
        print(json.dumps({"line": item["line"], "question": item["question"], "flags": list(s.flags),
                          "sources": s.sources, "probabilities": s.probabilities}, ensure_ascii=False), flush=True)
    return 2 if bad else 0


def _at_least_one(text: str) -> int:
    value = int(text) if text.lstrip("-").isdigit() else None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return value


def parse_args(argv=None):
    from medassist.safety.train import TASKS  # no torch: the recipes' defaults for the help, defined once there

    triage, guard = TASKS["triage"], TASKS["guard"]
    p = argparse.ArgumentParser(prog="python -m medassist.safety", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("screen", help="screen every question of a JSONL file")
    s.add_argument("--input", type=Path, required=True, help='JSONL of {"question": ...} ("instruction"/"text" too) or '
                   'of conversations {"messages": [...]} ending with a user turn')
    e = sub.add_parser("evaluate", help="recall, precision and false alarms on a labelled file")
    e.add_argument("--data", type=Path, required=True)
    e.add_argument("--kind", choices=["questions", "guard", "conversations"], default="questions")
    e.add_argument("--rules-only", action="store_true", help="the regex rules alone, without the triage model")
    e.add_argument("--json", action="store_true", help="the whole report (with every miss) as JSON")
    b = sub.add_parser("latency", help="screening time per question, one at a time")
    b.add_argument("--data", type=Path, required=True)
    b.add_argument("--repeats", type=int, default=1)
    t = sub.add_parser("train", help="retrain the triage head from the labelled data")
    t.add_argument("--task", choices=["triage", "guard"], default="triage",
                   help="triage: the question screen's model; guard: the output guard's sentence model")
    t.add_argument("--train", type=Path, nargs="+", default=None,
                   help="default: data/safety/train (triage) or data/safety/train-guard (guard)")
    t.add_argument("--dev", type=Path, nargs="+", default=None,
                   help="default: " + " ".join(map(str, triage.dev)) + " (triage) or "
                        + " ".join(map(str, guard.dev)) + " (guard)")
    t.add_argument("--out", type=Path, default=None,
                   help="default: the package's medassist/safety/triage/ or medassist/safety/guard_model/")
    t.add_argument("--rank", type=_at_least_one, default=None, help=f"LoRA rank of the encoder's adapter (default: "
                                                                    f"{triage.rank} for triage, {guard.rank} for guard)")
    t.add_argument("--epochs", type=_at_least_one, default=None,
                   help=f"default: {triage.epochs} for triage, {guard.epochs} for guard")
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--members", type=_at_least_one, default=None,
                   help="models trained alike with seeds seed, seed+1, ..., their probabilities averaged "
                        f"(default: {triage.members} for triage, {guard.members} for guard)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "screen":
            return screen(args.input)
        if args.command == "evaluate":
            from medassist.safety.labelled import table

            report = evaluate(args.data, args.kind, not args.rules_only)
            print(json.dumps(report, indent=1, ensure_ascii=False) if args.json
                  else f"{args.data}: {report['n']} rows, {report['seconds']} s\n{table(report)}")
            return 0
        if args.command == "latency":
            from medassist.safety.labelled import read_labelled

            print(json.dumps(latency([r["text"] for r in read_labelled(args.data)], args.repeats)))
            return 0
        from medassist.safety.train import TASKS, train

        meta = train(TASKS[args.task], args.train, args.dev, args.out, args.rank, args.epochs, args.lr, args.seed,
                     args.members, log=lambda line: print(line, file=sys.stderr, flush=True))
        print(json.dumps({k: meta[k] for k in ("thresholds", "dev", "train", "seconds")}, indent=1))
        return 0
    except UserError as e:
        print(e.line("safety"), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
