"""Measure medassist.safety.screen_question on a labelled question set.

Usage: python scripts/safety_eval.py [--data data/safety_eval.jsonl] [--json]
"""
import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # allow running as a plain script
    sys.path.insert(0, str(ROOT))

from medassist.safety import screen_question  # noqa: E402

DETECTORS = ("emergency", "crisis", "dosing_request", "diagnosis_request")


def load(path: Path) -> list[dict]:
    """Read the JSONL set; each line needs "question" and a bool for every detector."""
    rows = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        missing = [k for k in ("question",) + DETECTORS if k not in row]
        if missing:
            raise ValueError(f"{path}:{n}: missing field(s) {missing}; every line needs question and {DETECTORS}")
        rows.append(row)
    return rows


def evaluate(rows: list[dict]) -> dict:
    """Return {detector: {tp, fp, fn, tn, precision, recall, errors: [{question, expected}]}}."""
    report = {d: {"tp": 0, "fp": 0, "fn": 0, "tn": 0, "errors": []} for d in DETECTORS}
    for row in rows:
        flags = screen_question(row["question"]).flags
        for d in DETECTORS:
            got, want = d in flags, bool(row[d])
            r = report[d]
            r[{(True, True): "tp", (True, False): "fp", (False, True): "fn", (False, False): "tn"}[(got, want)]] += 1
            if got != want:
                r["errors"].append({"question": row["question"], "expected": want})
    for r in report.values():
        r["precision"] = r["tp"] / (r["tp"] + r["fp"]) if r["tp"] + r["fp"] else 1.0
        r["recall"] = r["tp"] / (r["tp"] + r["fn"]) if r["tp"] + r["fn"] else 1.0
    return report


def format_table(report: dict, n: int) -> str:
    """Human-readable table plus every misclassified question."""
    row = "{:<18} {:>4} {:>4} {:>4} {:>4} {:>9} {:>7}"
    lines = [f"{n} questions", row.format("detector", "TP", "FP", "FN", "TN", "precision", "recall")]
    for d, r in report.items():
        lines.append(row.format(d, r["tp"], r["fp"], r["fn"], r["tn"], f"{r['precision']:.3f}", f"{r['recall']:.3f}"))
    for d, r in report.items():
        for e in r["errors"]:
            kind = "missed (FN)" if e["expected"] else "false alarm (FP)"
            lines.append(f"  {d} {kind}: {e['question']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "safety_eval.jsonl")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    rows = load(args.data)
    report = evaluate(rows)
    print(json.dumps({"n": len(rows), "detectors": report}) if args.json else format_table(report, len(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
