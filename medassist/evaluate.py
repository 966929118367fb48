"""Evaluation: perplexity on reference answers, ROUGE-L of generated answers and the safety flags, together
(ROUGE alone rewards wording, not correctness: a MedQuAD fine-tuning study found it missed gains that human raters
saw); a JSON report, a base-vs-fine-tuned chart, TensorBoard.

`scripts/evaluate.py` is the command line. Perplexity runs the code Lightning validation runs (`tokenize_records`,
`collate`, `MedAssistLM.response_nll`, token-weighted); answers come from `generate.answer_batch`, as users get
them. The `SampleAnswers` callback (answers to fixed questions at each validation) is in callbacks.py.
"""

import gc
import json
import math
import platform
import re
import statistics
import sys
import time
from collections import Counter
from functools import partial
from pathlib import Path

import torch

from medassist.callbacks import SampleAnswers, markdown  # noqa: F401 (run configs saved before it moved)
from medassist import safety
from medassist.data import collate, messages_of, read_records, tokenize_records
from medassist.generate import answer_batch, load_for_generation, read_adapter_meta
from medassist.retrieval import SENTENCE_END, doc_of, relevant_passages
from medassist.sampling import Sampling

SAMPLES_SHOWN = 5  # answers per model written as TensorBoard text


def load_lm(base_model: str, adapter: str | None, quantization: str, precision: str, device: str):
    """A MedAssistLM on `device` as validation sees it: the adapter loaded, or a zero LoRA (B = 0: exactly the base,
    the model Lightning's sanity check measures), in eval mode with the int8 CPU fast path of model.py."""
    from peft import PeftModel, get_peft_model

    from medassist.loading import load_model, lora_config
    from medassist.model import MedAssistLM

    lm = MedAssistLM(base_model=base_model, quantization=quantization, precision=precision)
    hp = lm.hparams
    base = load_model(base_model, quantization, precision, hp.attn_implementation, device)
    if adapter:
        lm.model = PeftModel.from_pretrained(base, adapter)
    else:
        lm.model = get_peft_model(base, lora_config(hp.lora_r, hp.lora_alpha, hp.lora_dropout, hp.target_modules))
    lm.eval()
    if torch.device(device).type == "cpu":
        lm._int8_fast_path()  # bnb's int8 inference path is ~100x slower on CPUs; same numbers (see model.py)
    return lm


@torch.no_grad()
def perplexity(lm, tokenizer, records: list[dict], max_seq_length: int, batch_size: int, name: str = "data") -> dict:
    """exp(sum of response-token NLLs / number of response tokens), batched exactly as the validation loader; for a
    file with conversations also apart for first answers and follow-ups (as val/ppl_single, val/ppl_followup)."""
    dataset = tokenize_records(tokenizer, records, max_seq_length, name)
    loader = torch.utils.data.DataLoader(dataset.select_columns(["input_ids", "labels", "followup"]),
                                         batch_size=batch_size,
                                         collate_fn=partial(collate, pad_id=tokenizer.pad_token_id))
    device = next(lm.model.parameters()).device
    sums = {"single": [0.0, 0], "followup": [0.0, 0]}
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        follow = batch["followup"].bool()
        for part, (nll, n) in zip(sums.values(), lm.response_nlls(batch, [~follow, follow])):
            part[0], part[1] = part[0] + float(nll), part[1] + int(n)
    total, tokens = (sum(v[i] for v in sums.values()) for i in (0, 1))
    out = {"perplexity": math.exp(total / tokens), "response_nll": total / tokens, "response_tokens": tokens}
    if sums["followup"][1]:
        out.update({f"perplexity_{k}": math.exp(nll / n) for k, (nll, n) in sums.items() if n})
    return out


def content_words(text: str) -> set[str]:
    """Words of 4+ letters, lower-cased: what a supported sentence must share with its passage."""
    return {w for w in re.findall(r"[a-z]{4,}", text.lower())} - {"that", "this", "with", "from", "have", "your",
                                                                  "they", "them", "what", "which", "when", "will"}


def groundedness(answer: str, passages: list[str]) -> float | None:
    """The share of the answer's sentences (the model's text, `safety.unrender`) with at least half of their content
    words in the passages (None: no sentence with content words). A token-overlap measure: it sees copying, not
    paraphrase or truth."""
    known = content_words(" ".join(passages))
    sentences = [content_words(s) for s in SENTENCE_END.split(safety.unrender(answer))]
    sentences = [s for s in sentences if s]
    return sum(len(s & known) >= len(s) / 2 for s in sentences) / len(sentences) if sentences else None


def generation_metrics(model, tokenizer, records: list[dict], sampling: Sampling, batch_size: int,
                       model_name: str, adapter: str | None, index=None) -> dict:
    """ROUGE-L (torchmetrics) of the answers users would read (safety layer applied, disclaimer not counted) against
    the references, the safety flags' counts, and every answer; with `index`, answers from the retrieved passages
    and their groundedness (the mean share of answer sentences supported by the passages used)."""
    from torchmetrics.text.rouge import ROUGEScore

    rouge, flags, answers, began = ROUGEScore(rouge_keys=("rougeL",)), Counter(), [], time.perf_counter()
    for start in range(0, len(records), batch_size):
        print(f"  {model_name}{' + adapter' if adapter else ''}: {start}/{len(records)} answered "
              f"({time.perf_counter() - began:.0f} s)", file=sys.stderr, flush=True)  # minutes per batch on a CPU
        chunk = records[start : start + batch_size]
        turns = [messages_of(r) for r in chunk]  # a pair: its question; a conversation: up to its last answer
        outs = answer_batch(model, tokenizer, [t[:-1] for t in turns], sampling, model_name, adapter, index=index)
        used = [hits if out.get("sources") else [] for hits, out in  # the passages the answers were given
                zip(relevant_passages(index, [t[:-1] for t in turns]), outs)] if index else [[] for _ in turns]
        for r, ref, out, hits in zip(chunk, turns, outs, used):
            entry = {"id": r.get("id"), **({"conversation": out["conversation"]} if "conversation" in out else {}),
                     "question": out["question"], "reference": ref[-1]["content"]}
            if "error" in out:
                answers.append({**entry, "error": out["error"]})
                continue
            # the model's text only, with and without retrieval alike: the code's closing and source lines taken off
            text = safety.unrender(out["answer"])
            score = rouge(text, ref[-1]["content"])["rougeL_fmeasure"]  # forward: this pair, and accumulates
            flags.update(out["flags"])
            answers.append({**entry, "answer": out["answer"], "flags": out["flags"], "rougeL": round(float(score), 4),
                            **({"sources": out.get("sources", []),  # scored only where a passage was given
                                "grounded": groundedness(out["answer"], [h["text"] for h in hits])
                                if out.get("sources") else None} if index else {})})
    scored = sum("error" not in a for a in answers)
    total = {k.removeprefix("rougeL_"): round(float(v), 4) for k, v in rouge.compute().items()} if scored else {}
    out = {"rougeL": total, "flags": dict(sorted(flags.items())), "answered": scored,
           "errors": len(answers) - scored, "answers": answers}
    if index:
        shares = [a["grounded"] for a in answers if a.get("grounded") is not None]
        out["groundedness"] = round(sum(shares) / len(shares), 4) if shares else None
        out["with_source"] = sum(bool(a.get("sources")) for a in answers)
    return out


def evaluate_model(name: str, base_model: str, adapter: str | None, records: list[dict], args) -> dict:
    """All metrics for one model: perplexity with the training-time base (quantized), answers from the merged one."""
    from medassist.loading import load_tokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer, result, seconds = load_tokenizer(base_model), {"model": base_model, "adapter": adapter}, {}
    start = time.perf_counter()
    lm = load_lm(base_model, adapter, args.quantization, args.precision, device)
    result.update(perplexity(lm, tokenizer, records, args.max_seq_length, args.batch_size, f"{args.data} ({name})"))
    seconds["perplexity"] = round(time.perf_counter() - start, 1)
    del lm
    gc.collect()
    if args.max_new_tokens > 0:
        start = time.perf_counter()
        model, tokenizer, model_name = load_for_generation(adapter, base_model, args.precision,
                                                           decode_weights=args.decode_weights)
        sampling = Sampling(max_new_tokens=args.max_new_tokens)
        result.update(generation_metrics(model, tokenizer, records, sampling, args.batch_size, model_name, adapter))
        seconds["generation"] = round(time.perf_counter() - start, 1)
        if args.index:  # the same model, answering from the retrieved passages
            start = time.perf_counter()
            result["with_retrieval"] = generation_metrics(model, tokenizer, records, sampling, args.batch_size,
                                                          model_name, adapter, args.index)
            seconds["generation_with_retrieval"] = round(time.perf_counter() - start, 1)
        del model
        gc.collect()
    result["seconds"] = seconds
    grounded = result.get("with_retrieval", {})
    summary = ", ".join(f"{k} {v}" for k, v in [("perplexity", round(result["perplexity"], 3)),
                                                 ("ROUGE-L F", result.get("rougeL", {}).get("fmeasure")),
                                                 ("with retrieval", grounded.get("rougeL", {}).get("fmeasure")),
                                                 ("groundedness", grounded.get("groundedness")),
                                                 ("flags", result.get("flags"))] if v is not None)
    print(f"{name}: {summary} ({seconds})", flush=True)
    return result


def retrieval_accuracy(index, records: list[dict], path) -> dict:
    """Top-1 accuracy: the best passage comes from the question's own document (`retrieval.doc_of`), or is about the
    same topic (`focus`, case-folded: MedQuAD has several documents per topic, from different NIH sources); the share
    above the index's threshold, and the search time per question, one at a time as a server searches."""
    hits, times = [], []
    for r in records:
        start = time.perf_counter()
        hits.append(index.search([messages_of(r)[:-1][-1]["content"]], k=1)[0])
        times.append(time.perf_counter() - start)
    right = sum(bool(h) and h[0]["doc"] == doc_of(r, path) for r, h in zip(records, hits))
    topic = sum(bool(h) and (h[0]["doc"] == doc_of(r, path) or (bool(r.get("focus")) and
                                                                h[0]["focus"].casefold() == r["focus"].casefold()))
                for r, h in zip(records, hits))
    return {"top1_accuracy": round(right / len(records), 4), "top1_topic_accuracy": round(topic / len(records), 4),
            "questions": len(records),
            "above_threshold": sum(bool(h) and h[0]["score"] >= index.threshold for h in hits),
            "threshold": index.threshold, "median_ms": round(1000 * statistics.median(times), 2)}


def training_setting(adapter: str | None, key: str):
    """data.<key> from the config.yaml LightningCLI saved in the adapter's run directory (None if not there)."""
    config = Path(adapter).parent / "config.yaml" if adapter else None
    if config is None or not config.is_file():
        return None
    import yaml

    return (yaml.safe_load(config.read_text()) or {}).get("data", {}).get(key)


def spread(records: list[dict], limit: int | None) -> list[dict]:
    """`limit` records evenly spaced through the file (files are often sorted by source), all if limit is None."""
    if limit is None or limit >= len(records):
        return records
    return [records[i * len(records) // limit] for i in range(limit)]


def hardware() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": cpu, "torch_threads": torch.get_num_threads(), "gpu": gpu}


def run(args) -> dict:
    """Evaluate the base and/or the fine-tuned model on args.data; write the report (+ chart, TensorBoard)."""
    wall = time.perf_counter()
    meta = read_adapter_meta(args.adapter) if args.adapter else {}
    base_model = args.base_model or meta.get("base_model") or "embedded"
    args.quantization = args.quantization or meta.get("quantization", "int8")
    args.precision = args.precision or meta.get("precision", "auto")
    args.max_seq_length = args.max_seq_length or training_setting(args.adapter, "max_seq_length") or 384
    records = spread(read_records(args.data), args.limit)
    retrieval_report = None
    if args.index:
        from medassist import retrieval

        args.index = retrieval.load(args.index)
        retrieval_report = retrieval_accuracy(args.index, records, args.data)
    models = [("base", None)] if args.compare_base or not args.adapter else []
    models += [("fine-tuned", str(args.adapter))] if args.adapter else []
    results = {name: evaluate_model(name, base_model, adapter, records, args) for name, adapter in models}
    settings = {k: getattr(args, k) for k in ("limit", "max_new_tokens", "max_seq_length", "batch_size",
                                              "quantization", "precision")}
    settings["index"] = args.index.meta["files"] if args.index else None
    report = {"data": str(args.data), "examples": len(records), "settings": settings, "hardware": hardware(),
              **({"retrieval": retrieval_report} if retrieval_report else {}),
              "results": results, "wall_s": round(time.perf_counter() - wall, 1)}
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    if len(results) == 2:
        base, tuned = results["base"], results["fine-tuned"]
        report["comparison"] = {"perplexity_change": round(tuned["perplexity"] / base["perplexity"] - 1, 4)}
        if "rougeL" in base and base["rougeL"] and tuned["rougeL"]:
            report["comparison"]["rougeL_f_change"] = round(tuned["rougeL"]["fmeasure"] - base["rougeL"]["fmeasure"], 4)
        print(f"fine-tuned vs base: {report['comparison']}", flush=True)
        report["chart"] = str(write_chart(results, output.with_suffix(".png")))
    for name, r in results.items():  # what retrieval changes, model by model
        if r.get("rougeL") and r.get("with_retrieval", {}).get("rougeL"):
            change = round(r["with_retrieval"]["rougeL"]["fmeasure"] - r["rougeL"]["fmeasure"], 4)
            report.setdefault("comparison", {})[f"{name}_rougeL_f_change_with_retrieval"] = change
    output.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    if args.tensorboard:
        log_tensorboard(results, args.tensorboard, step=meta.get("step", 0))
    return report


def write_chart(results: dict, path: Path) -> Path:
    """Perplexity, ROUGE-L and safety flags of each model, side by side (PNG, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, colors = list(results), ["#999999", "#1f77b4", "#bbbbbb", "#6fa8dc"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    grounded = [f"{n}\n+ retrieval" for n in names if "with_retrieval" in results[n]]
    rouge = [results[n].get("rougeL", {}).get("fmeasure", 0) for n in names]
    rouge += [results[n]["with_retrieval"].get("rougeL", {}).get("fmeasure", 0) for n in names
              if "with_retrieval" in results[n]]
    panels = [("perplexity on reference answers (lower is better)", names, [results[n]["perplexity"] for n in names]),
              ("ROUGE-L F1 vs references (higher is better)", names + grounded, rouge)]
    for ax, (title, labels, values) in zip(axes, panels):
        bars = ax.bar(labels, values, color=colors[: len(labels)])
        ax.bar_label(bars, fmt="%.3g")
        ax.set_title(title, fontsize=10)
    flags = sorted({f for n in names for f in results[n].get("flags", {})}) or ["(none)"]
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        axes[2].bar([x + i * width for x in range(len(flags))], [results[n].get("flags", {}).get(f, 0) for f in flags],
                    width, label=n, color=colors[i])
    axes[2].set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(flags))], flags, rotation=30,
                       ha="right", fontsize=8)
    most = max([results[n].get("flags", {}).get(f, 0) for n in names for f in flags] + [1])
    axes[2].set_ylim(0, most * 1.15)  # counts: no negative axis when no flag fired
    axes[2].set_title("safety flags (answers)", fontsize=10)
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def log_tensorboard(results: dict, run_dir: str, step: int = 0) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(run_dir) as writer:
        for name, r in results.items():
            writer.add_scalar(f"eval/{name}/perplexity", r["perplexity"], step)
            if "rougeL" in r:
                writer.add_scalar(f"eval/{name}/rougeL_f", r["rougeL"].get("fmeasure", 0.0), step)
                for flag, count in r["flags"].items():
                    writer.add_scalar(f"eval/{name}/flags/{flag}", count, step)
                shown = [a for a in r["answers"] if "answer" in a][:SAMPLES_SHOWN]
                writer.add_text(f"eval/{name}/answers", "\n\n---\n\n".join(markdown(a) for a in shown), step)


