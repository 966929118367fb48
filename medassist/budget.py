"""A fit that ends within trainer.max_time on any CPU, with its learning-rate schedule planned to end there too.

The same config takes 5 minutes on a CPU with AMX and close to an hour on a slow one. Cutting a run short with
Lightning's timer alone would leave the cosine schedule half way (a high learning rate at the last step, results
that depend on where the timer fell); instead the speed of the first optimizer steps sets how many steps fit in the
budget, and the cosine reaches its floor at that step. The plan lives in the scheduler's state, so it is saved in
every checkpoint and a resumed run continues the same schedule instead of planning again on another machine's speed.
The first steps can be slower than the rest (on an AMX Xeon 4.8 s a step over steps 2-4, ~3.9 s later: 1.5 of
6.8 minutes went unused), so the plan is checked again a third and two thirds of the way, on the steps timed since
it was made, and moved where it is off by more than the noise of step times. Lightning's Timer stays the backstop:
if the steps slow down, it still stops the run at max_time.
"""

import math
import time
from datetime import timedelta

import lightning as L
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.utilities import rank_zero_info

MEASURED_STEPS = 3  # optimizer steps timed before planning, after the first (allocations and caches warm there)
MARGIN = 0.95  # plan for this share of the time left: step times vary with the batch's length and the machine
REPLANS = 2  # checks of the plan on the way (a third and two thirds of it), on the steps timed after it was made


class CosineToFloor:
    """LambdaLR factor: linear warm-up over `warmup` steps, then a cosine from 1 to `floor` at `total` steps, flat
    after it (transformers' cosine-with-min-lr formula). A callable object, not a closure, because LambdaLR saves an
    object's __dict__ with the scheduler: the plan travels in every checkpoint."""

    def __init__(self, warmup: int, total: int, floor: float):
        self.warmup, self.total, self.floor, self.planned = warmup, max(1, total), floor, False
        self.stop_at = None  # the planned last step, where the plan left steps out (else the run ends as configured)
        self.full = self.budget = None  # the configured steps and the budget (seconds) the plan was made for

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return step / max(1, self.warmup)
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.floor + (1 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def schedule_of(trainer) -> CosineToFloor | None:
    """The run's CosineToFloor, where its optimizer has one."""
    for config in getattr(trainer, "lr_scheduler_configs", []):
        for factor in getattr(config.scheduler, "lr_lambdas", []):
            if isinstance(factor, CosineToFloor):
                return factor
    return None


def configured_steps(trainer) -> int | None:
    """The optimizer steps the run is configured for (max_steps, or the epochs' worth; None: no limit). Read once the
    fit loop has its loader: asked earlier, Lightning sets up a loader whose position a resumed run never restores."""
    planned = trainer.estimated_stepping_batches
    if math.isfinite(planned):
        return int(planned)
    return trainer.max_steps if trainer.max_steps > 0 else None


def timer_of(trainer) -> Timer | None:
    """Lightning's Timer callback: where trainer.max_time lives."""
    return next((c for c in trainer.callbacks if isinstance(c, Timer)), None)


def budget_of(trainer) -> float | None:
    """trainer.max_time in seconds (Lightning keeps it in its Timer callback), or None."""
    timer = timer_of(trainer)
    left = None if timer is None else timer.time_remaining("train")
    return None if left is None else left + timer.time_elapsed("train")


def validations(done: int, total: int, every: int) -> int:
    """Validations still to run from step `done` to `total`: one every `every` optimizer steps on the way (the epoch
    ends, or val_check_interval's), one at the end."""
    return 1 + sum(1 for at in range(every, total, every) if at > done)


def steps_that_fit(done: int, full: int, every: int, left: float, step_s: float, val_s: float) -> int:
    """The most optimizer steps (at least done + 1, at most full) whose remaining steps and validations fit in `left`
    seconds."""
    for total in range(full, done, -1):
        if (total - done) * step_s + validations(done, total, every) * val_s <= left:
            return total
    return done + 1


class TimeBudget(L.Callback):
    """Plans the run's optimizer steps so that training, its validations included, ends within trainer.max_time
    (which, as Lightning counts it, starts after the base model's validation), and stops the fit there with a final
    validation. Prints what it expects at the start (from the speed of the base validation), and the plan."""

    # Training a token costs about this many times validating one (forward + backward through frozen weights and
    # the LoRA, against a forward; 1.5 in the default run on a Zen 4, bf16); only the first estimate uses it.
    TRAIN_OVER_VALIDATE = 1.5

    def __init__(self):
        self.val_seconds = self.val_tokens = self._sanity_start = None
        self.step_seconds, self.step_tokens, self._batch_start, self._step = [], [], None, None
        self._step_time, self._step_tokens = 0.0, 0
        self._replan_at, self._timed_from = [], 1  # none in a resumed run: it keeps the saved plan

    # ---- the base validation: its duration is what each later validation costs ---------------------------------
    def on_sanity_check_start(self, trainer, pl_module):
        self._sanity_start, self.val_tokens = time.monotonic(), 0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if trainer.sanity_checking:
            self.val_tokens += int(batch["attention_mask"].sum())

    def on_sanity_check_end(self, trainer, pl_module):
        self.val_seconds = time.monotonic() - self._sanity_start

    # ---- the first estimate ------------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module):
        self._step = trainer.global_step
        schedule = schedule_of(trainer)
        if schedule is None:
            return
        per_epoch, tokens = self._epoch_shape(trainer)
        budget, full = budget_of(trainer), configured_steps(trainer)
        budget = None if budget is None else round(budget)  # whole seconds: compared with the saved plan's
        if schedule.planned and (schedule.full, schedule.budget) == (full, budget):
            rank_zero_info(f"time budget: resuming the saved plan of {schedule.total} optimizer steps")
            if schedule.stop_at is not None and trainer.global_step >= schedule.stop_at:
                trainer.should_stop = True  # that run already ended at its plan
            return
        if schedule.planned:  # resumed with another length or budget: the old plan does not apply
            again = "planning again" if budget else "no budget now: the cosine runs over all of them"
            rank_zero_info(f"time budget: the saved plan was made for {schedule.full} optimizer steps and a budget "
                           f"of {schedule.budget and round(schedule.budget)} s; this run has {full} and "
                           f"{budget and round(budget)} s: {again}")
        # This run's length (a checkpoint's scheduler state carries the length of the run that wrote it).
        schedule.total = math.inf if full is None else max(1, full)
        schedule.planned, schedule.stop_at, schedule.full, schedule.budget = False, None, None, None
        if self.val_seconds and self.val_tokens and tokens and full:
            step_s = self.TRAIN_OVER_VALIDATE * self.val_seconds / self.val_tokens * tokens / per_epoch
            expect = (schedule.total - trainer.global_step) * step_s + validations(
                trainer.global_step, schedule.total, self._val_every(trainer, per_epoch)) * self.val_seconds
            limit = f"; trainer.max_time {timedelta(seconds=round(budget))} ends it sooner" if (
                budget and expect > budget) else ""
            rank_zero_info(f"expected training time on this CPU: about {_minutes(expect)} for {schedule.total} "
                           f"optimizer steps (estimated from the base validation's speed){limit}")
        if budget:
            rank_zero_info(f"time budget {timedelta(seconds=round(budget))}: the learning-rate schedule is planned "
                           f"after {MEASURED_STEPS + 1} optimizer steps, from their measured speed")

    # ---- timing the first steps, planning, stopping at the plan ------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._batch_start = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        schedule = schedule_of(trainer)
        if schedule is None or budget_of(trainer) is None:
            return
        self._step_time += time.monotonic() - self._batch_start
        self._step_tokens += int(batch["attention_mask"].sum())
        stepped, self._step = trainer.global_step != self._step, trainer.global_step  # an optimizer step ended
        if stepped:
            self.step_seconds.append(self._step_time)
            self.step_tokens.append(self._step_tokens)
            self._step_time, self._step_tokens = 0.0, 0
            if not schedule.planned and len(self.step_seconds) == MEASURED_STEPS + 1:
                self._plan(trainer, schedule)
            elif self._replan_at and trainer.global_step >= self._replan_at[0]:
                self._replan_at.pop(0)
                self._plan(trainer, schedule, again=True)
        if schedule.stop_at is not None and trainer.global_step >= schedule.stop_at:
            trainer.should_stop = True  # Lightning validates at this batch, then ends the fit

    def _plan(self, trainer, schedule: CosineToFloor, again: bool = False) -> None:
        """Set the cosine's length to the steps that fit in what is left of the budget: first from steps 2-4, again
        (`again`) from every step timed after that first plan, moving it only by more than the noise of step times."""
        per_epoch, tokens = self._epoch_shape(trainer)
        measured = self.step_seconds[self._timed_from:]  # the first step warms caches and allocators
        step_s = sum(measured) / len(measured)
        if tokens:  # seconds per token, times an average step's: batches are grouped by length
            step_s = sum(measured) / max(sum(self.step_tokens[self._timed_from:]), 1) * tokens / per_epoch
        left = timer_of(trainer).time_remaining("train") * MARGIN
        val_s = self.val_seconds or 0.0
        done, configured = trainer.global_step, configured_steps(trainer)
        full = math.inf if configured is None else configured
        bound = full if math.isfinite(full) else done + math.ceil(left / max(step_s, 1e-9))  # no step limit
        every = self._val_every(trainer, per_epoch)
        total = int(trainer.strategy.broadcast(steps_that_fit(done, bound, every, left, step_s, val_s)))
        before = schedule.total
        if again and abs(total - before) < max(3, 0.1 * before):  # within the noise of step times (batch lengths)
            return
        schedule.total, schedule.planned, schedule.stop_at = total, True, total if total < full else None
        schedule.full, schedule.budget = configured, round(budget_of(trainer))
        if total <= schedule.warmup:  # a plan shorter than the warm-up would end at its peak learning rate
            schedule.warmup = max(done, total // 2)
        expect = (total - done) * step_s + validations(done, total, every) * val_s
        what = f"all {full}" if total == full else f"{total} of the {full}" if math.isfinite(full) else f"{total} of unlimited"
        left_out = (f" ({full - total} steps left out to stay within trainer.max_time)"
                    if math.isfinite(full) and total < full else "")
        if again:
            rank_zero_info(f"time budget: {step_s:.1f} s per optimizer step over steps {self._timed_from + 1}-{done}; "
                           f"re-planned {what} steps (was {before}), the cosine now reaching its floor at step {total}; "
                           f"training ends in about {_minutes(expect)}{left_out}")
            return
        rank_zero_info(f"time budget: {step_s:.1f} s per optimizer step measured; planned {what} steps, the cosine "
                       f"reaching its floor at step {total}; training ends in about {_minutes(expect)}{left_out}")
        self._timed_from = len(self.step_seconds)
        self._replan_at = [done + (total - done) * k // (REPLANS + 1) for k in range(1, REPLANS + 1)]

    @staticmethod
    def _val_every(trainer, per_epoch: int) -> int:
        """Optimizer steps between validations: val_check_interval's batches, else an epoch."""
        batches = trainer.val_check_batch
        if batches is None or not math.isfinite(batches):
            return per_epoch
        return max(1, min(per_epoch, math.ceil(batches / trainer.accumulate_grad_batches)))

    @staticmethod
    def _epoch_shape(trainer) -> tuple[int, float]:
        """(optimizer steps per epoch, input tokens per epoch on this process, or None without our DataModule)."""
        batches = trainer.num_training_batches  # inf for a loader without a length: one "epoch" is then the whole run
        per_epoch = max(1, math.ceil(batches / trainer.accumulate_grad_batches)) if math.isfinite(batches) else 2**62
        dataset = getattr(trainer.datamodule, "train_set", None)
        return per_epoch, None if dataset is None else sum(dataset["length"]) / trainer.world_size


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"
