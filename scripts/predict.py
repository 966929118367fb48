"""Answer health questions with a fine-tuned adapter (or the base model): `python -m medassist ask` (same options).

    python scripts/predict.py --adapter checkpoints/lora/version_0/lora_adapter "What are the symptoms of diabetes?"
    python scripts/predict.py --adapter ... --input questions.jsonl --output answers.jsonl
    python scripts/predict.py --adapter ...                      # interactive chat, streaming
"""
import sys

from medassist import commands


def main(argv=None) -> int:
    return commands.main(["ask", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
