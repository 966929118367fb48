"""Callbacks and the checkpoint writer of a fit: the adapters (end of fit, best validation), SIGTERM handling, sample
answers in TensorBoard, and checkpoint files written atomically. The LightningModule is in model.py."""

import math
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from medassist.budget import configured_steps, schedule_of, timer_of
from medassist.files import write_file_atomic
from medassist.generate import answer_batch
from medassist.sampling import Sampling


TURNS = {"val/ppl_single": "first answers", "val/ppl_followup": "follow-ups"}


def describe(turns: dict, after: dict | None = None) -> str:
    """" (first answers 12.300, follow-ups 9.100)", or with `after` " (first answers 12.300 -> 8.000, ...)": the
    validation perplexity split by turn, where the set has both kinds."""
    if not (set(turns) | set(after or {})) - {"val/ppl_single"}:
        return ""  # no follow-ups: the split says nothing the total does not
    parts = [f"{label} {turns.get(key, math.nan):.3f}" + (f" -> {float(after.get(key, math.nan)):.3f}" if after else "")
             for key, label in TURNS.items()]
    return f" ({', '.join(parts)})"


class AdapterCheckpoint(L.Callback):
    """Saves the adapter to <run>/lora_adapter at the end of fit and to <run>/lora_adapter_best when val/ppl improves.

    The one owner of "the best model": the configs keep no ModelCheckpoint on val/ppl beside it. Nothing is written
    after a crash or a NaN: the last good adapters stay where they were.
    """

    def __init__(self, monitor: str = "val/ppl"):
        self.monitor, self.best, self.validated_at = monitor, math.inf, None

    def on_validation_end(self, trainer, pl_module):
        value = trainer.callback_metrics.get(self.monitor)
        if not trainer.sanity_checking and value is not None:
            self.validated_at = trainer.global_step
        if trainer.sanity_checking or value is None or not value < self.best:
            return
        self.best = float(value)
        self._save(trainer, pl_module, "lora_adapter_best", val_ppl=self.best)

    def on_fit_end(self, trainer, pl_module):
        ppl = trainer.callback_metrics.get(self.monitor)
        path = self._save(trainer, pl_module, "lora_adapter", val_ppl=None if ppl is None else float(ppl))
        base = "n/a" if pl_module.base_ppl is None else f"{pl_module.base_ppl:.3f}"
        final = "n/a" if ppl is None else f"{float(ppl):.3f}"
        if ppl is not None and self.validated_at not in (None, trainer.global_step):  # e.g. stopped by max_time
            final += f" (measured at step {self.validated_at}; the adapter is from step {trainer.global_step})"
        turns = describe(pl_module.base_turns, {k: trainer.callback_metrics[k] for k in TURNS
                                                if k in trainer.callback_metrics})
        rank_zero_info(f"validation perplexity: base {base} -> fine-tuned {final}{turns}; adapter saved to {path}")

    @staticmethod
    def _save(trainer, pl_module, name: str, **extra) -> Path | None:
        # Every rank must take part: log_dir is a broadcast, and FSDP gathers the state dict from all shards.
        run, state = Path(trainer.log_dir), trainer.strategy.lightning_module_state_dict()
        return pl_module.save_adapter(run / name, state, **extra) if trainer.is_global_zero else None

    def state_dict(self):
        return {"best": self.best, "validated_at": self.validated_at}

    def load_state_dict(self, state_dict):
        self.best, self.validated_at = state_dict["best"], state_dict.get("validated_at")


class CheckpointOnSigterm(L.Callback):
    """On SIGTERM (what schedulers send before killing a job) write last.ckpt, so `fit --ckpt_path last` resumes.

    Every rank must stop at the same point: one that stops alone leaves the others waiting in a collective.
    Lightning's own handler broadcasts from inside the signal handler, where it can meet another collective in flight
    and hang DDP (Lightning #20806; seen here with 2 CPU processes). This handler only notes the signal; after each
    optimizer step and validation batch the ranks add up their notes, and all stop together if any was signalled.
    """

    def __init__(self):
        self.installed, self.signalled, self.step = False, False, -1

    def on_train_start(self, trainer, pl_module):
        # Lightning has installed its handlers by now; it puts the original ones back after fit.
        signal.signal(signal.SIGTERM, self._note)
        self.installed = True

    def _note(self, signum, frame):
        self.signalled = True

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self.step:  # an optimizer step, not a micro-batch inside one
            self._stop_if_signalled(trainer, pl_module)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._stop_if_signalled(trainer, pl_module)

    def _stop_if_signalled(self, trainer, pl_module):
        if not self.installed:  # not fitting, or the sanity check before training
            return
        votes = trainer.strategy.reduce(torch.tensor(float(self.signalled), device=pl_module.device), reduce_op="sum")
        if votes > 0:
            raise SIGTERMException  # on every rank at once; on_exception below saves

    def on_exception(self, trainer, pl_module, exception):
        if not isinstance(exception, SIGTERMException):
            return
        for callback in trainer.checkpoint_callbacks:
            if callback.save_last and callback.dirpath:
                path = Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
                trainer.save_checkpoint(path)
                rank_zero_info(f"SIGTERM: saved {path} at step {trainer.global_step}")
                return


class ProgressLines(L.Callback):
    """A plain line every `every_n_steps` optimizer steps when stderr is not a terminal (CI, nohup, a scheduler's log
    file), where Lightning's progress bar writes nothing readable:
    `step 20/92 (epoch 1): loss 1.234, 312 tokens/s, elapsed 0:01:40, ETA 0:06:10` (tokens/s: the mean since the
    start, validations included). ETA: the mean time per step so far times the steps left, capped by what
    trainer.max_time leaves. `always`: also on a terminal."""

    def __init__(self, every_n_steps: int = 5, always: bool = False):
        self.every, self.always = max(1, every_n_steps), always
        self.enabled, self.started, self.first_step, self.total, self._last, self.tokens = False, 0.0, 0, 0, None, 0

    def on_train_start(self, trainer, pl_module):
        self.enabled = self.always or not sys.stderr.isatty()
        self.started, self.first_step = time.monotonic(), trainer.global_step  # a resumed run counts from here
        self.total = configured_steps(trainer)
        self.tokens = 0  # input tokens trained on since the start (padding excluded)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        self.tokens += int(batch["attention_mask"].sum())
        if not self.enabled or step == self.first_step or step % self.every or self._last == step:
            return
        self._last = step  # the micro-batches of one optimizer step all end with the same global_step
        rank_zero_info(self.line(trainer, step, time.monotonic() - self.started))

    def line(self, trainer, step: int, elapsed: float) -> str:
        schedule = schedule_of(trainer)
        total = schedule.total if schedule is not None and schedule.planned else self.total  # budget.TimeBudget's plan
        left = elapsed / (step - self.first_step) * max(total - step, 0) if total else math.inf
        timer = timer_of(trainer)
        if timer is not None and timer.time_remaining("train") is not None:  # the budget ends the run, whatever
            left = min(left, max(timer.time_remaining("train"), 0.0))       # the steps say
        loss = trainer.callback_metrics.get("train/loss")
        return (f"step {step}/{total or '?'} (epoch {trainer.current_epoch + 1})"
                + (f": loss {float(loss):.3f}" if loss is not None else ":")
                + f", {self.tokens / max(elapsed, 1e-9):.0f} tokens/s, elapsed {timedelta(seconds=round(elapsed))}"
                + (f", ETA {timedelta(seconds=round(left))}" if math.isfinite(left) else ""))


class SampleAnswers(L.Callback):
    """At every n-th validation (and before training: the base's answers), answers to a few fixed questions from the
    model being trained, logged as TensorBoard text (`samples/<i>`). Greedy, safety layer applied.

    Args:
        questions: a few questions (each costs one batched generation of max_new_tokens per validation).
        every_n_validations: log at validations n, 2n, ... (the one before training is always logged).
        max_new_tokens: answer length; ~60 keeps it to seconds on a CPU.
    """

    def __init__(self, questions: list[str], every_n_validations: int = 1, max_new_tokens: int = 60):
        self.questions, self.every = list(questions), max(1, every_n_validations)
        self.sampling = Sampling(max_new_tokens=max_new_tokens)
        self.validations = 0

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.validations += 1
            if self.validations % self.every:
                return
        experiment = getattr(trainer.logger, "experiment", None)
        if not trainer.is_global_zero or not self.questions or not hasattr(experiment, "add_text"):
            return
        # Generation seeds torch; keep the training RNG where it was so a run is the same with or without samples.
        cuda = [pl_module.device.index or 0] if pl_module.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            records = answer_batch(pl_module.model, trainer.datamodule.tokenizer, self.questions, self.sampling,
                                   index=getattr(trainer.datamodule, "retriever", None))  # as answers will be given
        for i, record in enumerate(records):
            text = markdown(record) if "answer" in record else f"**Q:** {record['question']}  \n*{record['error']}*"
            experiment.add_text(f"samples/{i}", text, trainer.global_step)

    def state_dict(self):
        return {"validations": self.validations}

    def load_state_dict(self, state_dict):
        self.validations = state_dict["validations"]


def markdown(answer: dict) -> str:
    """One answer record as TensorBoard text: question, answer, and the safety flags that fired."""
    flags = f"  \n*flags: {', '.join(answer['flags'])}*" if answer.get("flags") else ""
    return f"**Q:** {answer['question']}  \n**A:** {answer['answer']}{flags}"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint beside its final name, syncs it to disk, then renames: a kill mid-save keeps the old file.

    Lightning's own save stages the file in $TMPDIR and moves it into place; when that is another filesystem (a tmpfs
    /tmp, a network checkpoint directory) the move is a copy onto the final name, which a kill leaves half-written.
    """

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        if "://" in str(path):  # remote storage: fsspec's transaction is the atomic step there
            return super().save_checkpoint(checkpoint, path, storage_options)
        write_file_atomic(path, lambda f: torch.save(checkpoint, f))
