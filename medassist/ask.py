"""`python -m medassist ask`: answer questions with an adapter (or the base model) through the safety layer.

    python -m medassist ask --adapter checkpoints/lora/version_0/lora_adapter "What are the symptoms of diabetes?"
    python -m medassist ask --adapter ... --input questions.jsonl --output answers.jsonl
    python -m medassist ask --adapter ...                      # interactive chat, streaming; /reset forgets it
Exit status 2 on bad input (the other lines of a file are still answered). `scripts/predict.py` is this command.
"""

import argparse
import json
import sys

from medassist import UserError, retrieval, safety
from medassist.files import write_jsonl_atomic
from medassist.records import error_record, read_questions
from medassist.sampling import Sampling, add_decode_weights_argument


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m medassist ask", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("question", nargs="?", help="one question; omit it (and --input) for an interactive chat")
    p.add_argument("--adapter", help="a lora_adapter/ directory written by fit; omit to answer with the base model")
    p.add_argument("--base-model", help="base model source (default: the one the adapter was trained on, "
                                        "else 'embedded')")
    p.add_argument("--input", help="JSONL file of {\"question\": ...} (\"instruction\" accepted) or of conversations "
                                   "{\"messages\": [...]} that end with the user's question; optional \"id\"")
    p.add_argument("--output", help="where --input's answers go (JSONL, one record per line, input order)")
    p.add_argument("--json", action="store_true", help="print the structured record for one question")
    p.add_argument("--index", help="answer from a retrieval index (`python -m medassist index build`) and name the "
                                   "sources")
    p.add_argument("--batch-size", type=int, default=8, help="questions generated together with --input")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    add_decode_weights_argument(p)
    p.add_argument("--allow-template-mismatch", action="store_true")
    defaults = Sampling()
    for name, value in vars(defaults).items():
        p.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    return p.parse_args(argv)


def answer_file(assistant, args) -> int:
    items = read_questions(args.input)
    good = [item for item in items if "error" not in item]
    answered = iter([record for i in range(0, len(good), args.batch_size)
                     for record in assistant.answer_batch([item["question"] for item in good[i : i + args.batch_size]],
                                                          [item.get("id") for item in good[i : i + args.batch_size]])])
    records = []
    for item in items:
        record = error_record(None, item["error"]) if "error" in item else next(answered)
        if "error" in record and "error" not in item:
            record["error"] = f"{args.input}:{item['line']}: {record['error']}"
        records.append(record)
    write_jsonl_atomic(args.output, records)
    errors = [record["error"] for record in records if "error" in record]
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    print(f"wrote {len(records)} records to {args.output} ({len(errors)} with errors)", file=sys.stderr)
    return 2 if errors else 0


def chat(assistant) -> int:
    """Questions from the terminal; the conversation is kept (the model sees it, the screen reads its latest turns)
    until /reset."""
    print("medassist — educational answers, not medical advice. /reset starts a new conversation; an empty line or "
          "Ctrl-D quits.", file=sys.stderr)
    history: list[dict] = []
    while True:
        try:
            question = input("\nyou> ")
        except EOFError:
            return 0
        if not question.strip():
            return 0
        if question.strip() == "/reset":
            history = []
            print("(new conversation)", file=sys.stderr)
            continue
        try:
            for piece in assistant.stream(history + [{"role": "user", "content": question}]):
                if isinstance(piece, str):
                    print(piece, end="", flush=True)
                else:  # the record: the answer as the model's turn, without the lines the code added
                    history += [{"role": "user", "content": piece["question"]},
                                {"role": "assistant", "content": safety.unrender(piece["answer"])}]
            print()
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)


def main(argv=None) -> int:
    """Bad input raises UserError before a model loads (medassist.commands shows it as one line, exit 2)."""
    args = parse_args(argv)
    sampling = Sampling(**{name: getattr(args, name) for name in vars(Sampling())})
    if args.input and not args.output:
        raise UserError("--input needs --output (where the JSONL answers go)")
    try:
        if args.question is not None:
            safety.validate_question(args.question)  # fail before loading a model
    except ValueError as e:  # the safety layer's input errors
        raise UserError(str(e)) from None
    if args.input:
        read_questions(args.input)  # a missing or unreadable file fails before loading a model
    index = retrieval.load(args.index) if args.index else None
    from medassist.generate import Assistant  # torch and transformers: only once the input is known to be good

    assistant = Assistant(args.adapter, args.base_model, args.precision, sampling, args.allow_template_mismatch,
                          index, args.decode_weights)
    if args.input:
        return answer_file(assistant, args)
    if args.question is None:
        return chat(assistant)
    record = assistant.answer(args.question)
    print(json.dumps(record, ensure_ascii=False, indent=2) if args.json else safety.render(record))
    return 0
