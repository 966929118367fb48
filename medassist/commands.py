"""The one command: `python -m medassist <command> ...`; each command's own `--help` lists its options.

    fit | validate | test | predict   LightningCLI (medassist/cli.py): train, measure, Lightning's predict loop
    ask                               answer questions with an adapter (medassist/ask.py; scripts/predict.py)
    serve                             the OpenAI-compatible server and web chat (medassist/serve.py)
    merge                             fold an adapter into its base (medassist/merge.py)
    export                            a merged adapter as GGUF + Ollama Modelfile (medassist/export.py)
    import | check                    data importers and the data checker (medassist/dataprep.py)
    evaluate                          perplexity, ROUGE-L and safety flags on reference answers (medassist/evaluate.py)
    index                             a retrieval index of a trusted collection (medassist/index.py)
    safety                            the safety layer's screen, evaluation and triage training

One error style: a UserError is one line, `medassist <command>: error: ...`, exit status 2, no traceback. Logging is
configured here, once: medassist's routine messages at INFO, warnings as warnings. Each command's module is imported
only when it runs, so `serve` and `ask` never load Lightning.
"""
import argparse
import logging
import sys
from importlib import import_module

from medassist import UserError
from medassist.sampling import add_decode_weights_argument

LIGHTNING = ("fit", "validate", "test", "predict")


def _lightning(command: str, argv: list[str]):
    return import_module("medassist.cli").main([command, *argv])


def _evaluate(argv: list[str]) -> int:
    args = evaluate_args(argv)
    from medassist import evaluate  # torch, transformers: only once the options are known to be good

    report = evaluate.run(args)
    print(f"wrote {args.output}" + (f" and {report['chart']}" if "chart" in report else "")
          + f" ({report['examples']} examples, {report['wall_s']} s)", file=sys.stderr)
    return 0


def evaluate_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m medassist evaluate", description=EVALUATE_DOC,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
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
    add_decode_weights_argument(p)
    p.add_argument("--tensorboard", metavar="RUN_DIR", help="also log the metrics to this TensorBoard directory")
    p.add_argument("--index", help="also answer from this retrieval index: retrieval accuracy, and ROUGE-L and "
                                   "groundedness with retrieval beside those without")
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be at least 1")
    return args


EVALUATE_DOC = """Evaluate a fine-tuned adapter (and/or the base model) on a JSONL file of reference answers.

    python -m medassist evaluate --adapter checkpoints/medquad/version_0/lora_adapter \\
        --data data/medquad/validation.jsonl --limit 100 --compare-base --output reports/medquad.json
    python -m medassist evaluate --data data/validation.jsonl --output base.json        # the base model alone

Reports perplexity on the reference answers (response tokens only, the code Lightning validation runs), ROUGE-L of
the generated answers and the safety layer's flags; with two models also a PNG chart beside the report. With
--index DIR: the top-1 retrieval accuracy, and each model's answers again from the retrieved passages (ROUGE-L and
groundedness: the share of answer sentences with at least half of their content words in the passage).
--max-new-tokens 0 skips generation (perplexity only). Exit status 2 on bad input.
"""

COMMANDS = {
    **{name: (lambda argv, name=name: _lightning(name, argv)) for name in LIGHTNING},
    "ask": lambda argv: import_module("medassist.ask").main(argv),
    "serve": lambda argv: import_module("medassist.serve").main(argv),
    "merge": lambda argv: import_module("medassist.merge").main(argv),
    "export": lambda argv: import_module("medassist.export").main(argv),
    "import": lambda argv: import_module("medassist.dataprep").main(["import", *argv]),
    "check": lambda argv: import_module("medassist.dataprep").main(["check", *argv]),
    "evaluate": _evaluate,
    "index": lambda argv: import_module("medassist.index").main(argv),
    "safety": lambda argv: import_module("medassist.safety.__main__").main(argv),
}


class _Format(logging.Formatter):
    """`medassist: resuming from ...` for routine messages, `medassist: warning: ...` for the rest."""

    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        return f"medassist: {level}{super().format(record)}"


def configure_logging(level: int = logging.INFO) -> None:
    """medassist's loggers print to stderr at `level`; other libraries' logging is left as they set it."""
    logger = logging.getLogger("medassist")
    if not any(isinstance(h.formatter, _Format) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(_Format("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False  # one line per message, whatever the root logger has


def usage() -> str:
    return f"usage: python -m medassist <{'|'.join(COMMANDS)}> [options]; `<command> --help` for its options"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__ + "\n" + usage(), file=sys.stderr if not argv else sys.stdout)
        return 2 if not argv else 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"medassist: error: unknown command {command!r}; {usage()}", file=sys.stderr)
        return 2
    configure_logging()
    try:
        return COMMANDS[command](rest) or 0
    except UserError as e:
        print(e.line(command), file=sys.stderr)
        return 2
