"""Labelled safety data: reading it (file:line errors) and scoring a screen against it.

Question lines:  {"text": "...", "labels": ["emergency", ...], "style": "...", "note": "..."}
Guard lines:     {"text": "<one generated sentence>", "labels": ["dose_removed", ...]}
Conversations:   {"messages": [{"role": "user"|"assistant", "content": "..."}, ...], "labels": [...]}
Labels are defined in the README's safety section; [] means none applies.
The older regression set (data/safety_eval.jsonl: "question" and one bool per label) is read too.
"""
import json
from pathlib import Path

from medassist import UserError
from medassist.records import listed
from medassist.safety.lines import GUARD_FLAGS, SCREEN_FLAGS


def _labels(row: dict, allowed: tuple, where: str) -> list[str]:
    if "labels" not in row:  # the older regression set: one bool per label
        return [label for label in allowed if row.get(label) is True]
    labels = row["labels"]
    if not isinstance(labels, list) or any(label not in allowed for label in labels):
        raise UserError(f"{where}: \"labels\" must be a list of {list(allowed)}, got {labels!r}")
    return labels


def read_labelled(path: str | Path, kind: str = "questions") -> list[dict]:
    """Rows {"text" or "messages", "labels", ...} of a labelled JSONL file; every bad line named at once."""
    allowed = GUARD_FLAGS if kind == "guard" else SCREEN_FLAGS
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise UserError(f"{path}: cannot read labelled data ({e.strerror})") from None
    rows, problems = [], []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise UserError(f"{where}: expected a JSON object")
            text = row.get("text", row.get("question"))
            if kind == "conversations":
                messages = row.get("messages")
                if not isinstance(messages, list) or not messages or messages[-1].get("role") != "user":
                    raise UserError(f"{where}: \"messages\" must be a list of turns ending with a user turn")
            elif not isinstance(text, str) or not text.strip():
                raise UserError(f"{where}: \"text\" must be a non-empty string")
            rows.append({**row, "text": text, "labels": _labels(row, allowed, where), "where": where})
        except json.JSONDecodeError as e:
            problems.append(f"{where}: not valid JSON ({e.msg}); one object per line")
        except UserError as e:
            problems.append(str(e))
    if problems:
        raise UserError(f"{len(problems)} bad line(s) in {path}:\n" + listed(problems))
    return rows


def read_many(paths, kind: str = "questions") -> list[dict]:
    """read_labelled over files and directories (every *.jsonl inside, in name order)."""
    rows = []
    for path in paths:
        path = Path(path)
        files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
        if not files:
            raise UserError(f"{path}: no *.jsonl files of labelled data")
        for file in files:
            rows.extend(read_labelled(file, kind))
    return rows


def score(rows: list[dict], predicted: list[set[str]], labels: tuple = SCREEN_FLAGS) -> dict:
    """Per label: counts, recall, precision, and the false-alarm rate on rows that carry no label at all (the
    look-alike negatives), plus the misses and false alarms themselves."""
    report = {}
    negatives = [i for i, row in enumerate(rows) if not row["labels"]]
    for label in labels:
        pos = [i for i, row in enumerate(rows) if label in row["labels"]]
        tp = sum(label in predicted[i] for i in pos)
        fp = sum(label in predicted[i] for i, row in enumerate(rows) if label not in row["labels"])
        alarms = sum(label in predicted[i] for i in negatives)
        report[label] = {
            "positives": len(pos), "tp": tp, "fn": len(pos) - tp, "fp": fp,
            "recall": tp / len(pos) if pos else None,
            "precision": tp / (tp + fp) if tp + fp else None,
            "false_alarms_on_negatives": alarms,
            "missed": [rows[i]["text"] for i in pos if label not in predicted[i]],
            "false_alarms": [rows[i]["text"] for i, row in enumerate(rows)
                             if label not in row["labels"] and label in predicted[i]],
        }
    flagged = sum(bool(predicted[i]) for i in negatives)
    report["negatives"] = {"n": len(negatives), "any_flag": flagged,
                           "false_alarm_rate": flagged / len(negatives) if negatives else None}
    return report


def table(report: dict) -> str:
    """The report as a plain table (misses left out: see --json)."""
    row = "{:<21} {:>5} {:>5} {:>5} {:>5} {:>8} {:>9}"
    lines = [row.format("label", "pos", "TP", "FN", "FP", "recall", "precision")]
    for label, r in report.items():
        if not isinstance(r, dict) or "positives" not in r:
            continue
        fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
        lines.append(row.format(label, r["positives"], r["tp"], r["fn"], r["fp"], fmt(r["recall"]),
                                fmt(r["precision"])))
    neg = report["negatives"]
    if neg["n"]:
        what = "removed" if "over_removed" in report else "flagged"
        lines.append(f"rows with no label: {neg['any_flag']}/{neg['n']} {what} ({neg['false_alarm_rate']:.1%})")
    return "\n".join(lines)
