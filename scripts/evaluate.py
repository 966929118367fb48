"""Evaluate a fine-tuned adapter (and/or the base model) on a JSONL file of reference answers.

    python scripts/evaluate.py --adapter checkpoints/medquad/version_0/lora_adapter \\
        --data ../shared/data/medquad/validation.jsonl --limit 100 --compare-base --output reports/medquad.json
    python scripts/evaluate.py --data data/validation.jsonl --output base.json        # the base model alone

Reports perplexity on the reference answers (response tokens only, the code Lightning validation runs), ROUGE-L of
the generated answers and the safety layer's flags; with two models also a PNG chart beside the report.
--max-new-tokens 0 skips generation (perplexity only). Exit status 2 on bad input.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from medassist import UserError  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", help="a lora_adapter/ directory written by fit; omit to evaluate the base model")
    p.add_argument("--data", required=True, help="JSONL of {instruction, input?, output} (the references)")
    p.add_argument("--output", required=True, help="the JSON report; the chart goes beside it as .png")
    p.add_argument("--base-model", help="default: the adapter's base model, else 'embedded'")
    p.add_argument("--compare-base", action="store_true", help="evaluate the base model on the same data too")
    p.add_argument("--limit", type=int, help="N examples evenly spaced through the file (generation is slow on a CPU)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="answer length; 0 = perplexity only")
    p.add_argument("--max-seq-length", type=int, help="truncation for perplexity (default: the training run's, "
                                                     "from config.yaml beside the adapter, else 384)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--quantization", choices=["int8", "nf4", "none"],
                   help="base for perplexity (default: the adapter's, else int8); answers use the merged fp model")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], help="default: the adapter's, else auto")
    p.add_argument("--tensorboard", metavar="RUN_DIR", help="also log the metrics to this TensorBoard directory")
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from medassist.evaluate import run

    try:
        report = run(args)
    except UserError as e:
        print(f"medassist: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}" + (f" and {report['chart']}" if "chart" in report else "")
          + f" ({report['examples']} examples, {report['wall_s']} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
