"""Evaluate an adapter (and/or the base model) on reference answers: `python -m medassist evaluate` (same options).

    python scripts/evaluate.py --adapter checkpoints/medquad/version_0/lora_adapter \
        --data data/medquad/validation.jsonl --limit 100 --compare-base --output reports/medquad.json
"""
import sys

from medassist import commands


def main(argv=None) -> int:
    return commands.main(["evaluate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
