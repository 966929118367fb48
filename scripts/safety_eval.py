"""Measure the safety screen on a labelled question set: `python -m medassist safety evaluate` (same options).

Usage: python scripts/safety_eval.py [--data data/safety_eval.jsonl] [--kind questions|guard|conversations]
                                     [--rules-only] [--json]
"""
import sys

from medassist.commands import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    sys.exit(main(["safety", "evaluate", *(argv if "--data" in argv else ["--data", "data/safety_eval.jsonl", *argv])]))
