"""Test-only callbacks for the real CLI in a subprocess, and the helper that runs it.

The subprocess imports this module (PYTHONPATH=tests) from `--trainer.callbacks+=probes.<Name>`. Each probe acts at
a chosen optimizer step, so the tests know exactly what happened when, with no sleeps and no timing.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, timeout=240, env=None):
    """`python -m medassist ...` from the project root, with this module importable, on one torch thread: the tiny
    model's ops gain nothing from a second one, and on 2 cores that are busy (another job, a second fit) two threads
    wait on each other: a fit took 8.5 s on one thread and 25-54 s on two with another job on the cores."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests"),
           **(env or {})}
    return subprocess.run([sys.executable, "-m", "medassist", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def probe(name: str, **init_args) -> list[str]:
    """CLI arguments that append the callback probes.<name>(**init_args)."""
    return [f"--trainer.callbacks+=probes.{name}", *(a for k, v in init_args.items()
                                                      for a in (f"--trainer.callbacks.{k}", str(v)))]


def write_data(directory: Path, every_n_steps: int = 3) -> Path:
    """40 training and 4 validation examples of the bundled data, and every_n.yaml: lora.yaml's callbacks with
    last.ckpt every `every_n_steps` optimizer steps (layer it after lora.yaml)."""
    lines = (ROOT / "data" / "train.jsonl").read_text().splitlines()
    (directory / "train.jsonl").write_text("\n".join(lines[:40]) + "\n")
    (directory / "val.jsonl").write_text("\n".join(lines[40:44]) + "\n")
    callbacks = yaml.safe_load((ROOT / "configs" / "lora.yaml").read_text())["trainer"]["callbacks"]
    for callback in callbacks:
        if callback["init_args"].get("save_last"):
            callback["init_args"]["every_n_train_steps"] = every_n_steps
    (directory / "every_n.yaml").write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}))
    return directory


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def by_process(records: list[dict]) -> list[list[dict]]:
    """RecordBatches rows grouped by the process that wrote them, in order: [first run's rows, resumed run's rows]."""
    runs = {}
    for row in records:
        runs.setdefault(row["pid"], []).append(row)
    return list(runs.values())


class RecordBatches(L.Callback):
    """One line per training batch in <out>/rank<r>.jsonl: pid, step, epoch, example indices, this rank's loss."""

    def __init__(self, out: str):
        self.out = Path(out)

    def on_train_start(self, trainer, pl_module):
        self.index = {tuple(ids): i for i, ids in enumerate(trainer.datamodule.train_set["input_ids"])}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        lengths = batch["attention_mask"].sum(1).tolist()
        examples = [self.index[tuple(ids[:n].tolist())] for ids, n in zip(batch["input_ids"], lengths)]
        # training_step returns nll / tokens_per_batch; this rank's mean loss is nll / its own supervised tokens
        supervised = int((batch["labels"][:, 1:] != -100).sum())
        loss = float(outputs["loss"]) * trainer.datamodule.tokens_per_batch / supervised
        row = {"pid": os.getpid(), "step": trainer.global_step, "epoch": trainer.current_epoch,
               "batch_idx": batch_idx, "examples": examples, "loss": loss,
               "checkpoint_io": type(trainer.strategy.checkpoint_io).__name__}
        with (self.out / f"rank{trainer.global_rank}.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")


class SignalAt(L.Callback):
    """Sends `signal` (SIGKILL, SIGTERM) to its own process once `step` optimizer steps are done, on one rank."""

    def __init__(self, step: int, signal: str = "SIGKILL", rank: int = 0):
        self.step, self.signal, self.rank = step, signal, rank

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # Runs before ModelCheckpoint's hook for this batch (Lightning calls checkpoint callbacks last), so a
        # SIGKILL here loses the steps since the last periodic checkpoint, as a real crash would.
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            os.kill(os.getpid(), getattr(signal, self.signal))


class PoisonAt(L.Callback):
    """Sets one LoRA weight to NaN before the batch that would make optimizer step `step` + 1 (one rank or all)."""

    def __init__(self, step: int, rank: int | None = None):
        self.step, self.rank = step, rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and self.rank in (None, trainer.global_rank):
            with torch.no_grad():
                next(p for p in pl_module.parameters() if p.requires_grad).fill_(float("nan"))


class Clock(L.Callback):
    """Makes every training batch take `train_s` and every validation batch `val_s` seconds more on time.monotonic,
    the clock of Lightning's Timer and of budget.TimeBudget: a time budget can be tested without waiting for it.
    With `later_s`, the batches after the first `after` take that long instead (a run that speeds up or slows down)."""

    def __init__(self, train_s: float, val_s: float, later_s: float | None = None, after: int = 0):
        import time

        self.train_s, self.val_s, self.offset, real = train_s, val_s, 0.0, time.monotonic
        self.later_s, self.after, self.batches = later_s, after, 0
        time.monotonic = lambda: real() + self.offset

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # before TimeBudget's hook: callbacks from the config run before the model's
        self.batches += 1
        later = self.later_s is not None and self.batches > self.after
        self.offset += self.later_s if later else self.train_s

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.offset += self.val_s
