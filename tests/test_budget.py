"""The time budget (budget.py): the steps that fit, the planned cosine, and a fit on the tiny model that plans from
its first steps, ends at the plan within trainer.max_time, and resumes with the same plan (probes.Clock adds
seconds to every batch, so the budget is reached without waiting for it)."""

import json
import re
import signal
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from probes import probe, run_cli, write_data
from test_cli import scalars

from medassist.budget import MEASURED_STEPS, CosineToFloor, steps_that_fit, validations

LR, FLOOR, WARMUP = 3e-4, 0.1, 2


def test_validations_count_the_epoch_ends_on_the_way_and_the_last_step():
    assert validations(done=4, total=15, every=20) == 1
    assert validations(done=4, total=20, every=20) == 1  # the epoch end is the last step's validation
    assert validations(done=4, total=30, every=20) == 2
    assert validations(done=25, total=30, every=20) == 1  # epoch 1's validation is behind


def test_steps_that_fit_leave_room_for_the_validations():
    # 100 s left, 2 s per step, a validation costs 10 s: 45 more steps with one validation
    assert steps_that_fit(done=5, full=200, every=1000, left=100, step_s=2, val_s=10) == 50
    # crossing the epoch end at step 30 costs one validation more: 40 steps and two validations
    assert steps_that_fit(done=5, full=200, every=30, left=100, step_s=2, val_s=10) == 45
    assert steps_that_fit(done=5, full=20, every=1000, left=100, step_s=2, val_s=10) == 20  # all fit
    assert steps_that_fit(done=5, full=200, every=1000, left=1, step_s=2, val_s=10) == 6  # at least one more


def test_cosine_to_floor_matches_transformers_and_keeps_its_plan_in_the_scheduler_state():
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    theirs = get_cosine_with_min_lr_schedule_with_warmup(optimizer, 10, 112, min_lr_rate=FLOOR).lr_lambdas[0]
    ours = CosineToFloor(10, 112, FLOOR)
    assert all(abs(ours(step) - theirs(step)) < 1e-12 for step in range(113))
    assert ours(500) == pytest.approx(FLOOR)  # flat after the plan, not back up as the cosine would go

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, ours)
    ours.total, ours.planned = 40, True
    state = scheduler.state_dict()
    fresh = CosineToFloor(10, 112, FLOOR)
    torch.optim.lr_scheduler.LambdaLR(optimizer, fresh).load_state_dict(state)
    assert (fresh.total, fresh.planned) == (40, True)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("data"), every_n_steps=3)  # 40 examples: 20 steps of 2 per epoch


def budget_fit(tiny_model_dir, data, out, *extra, clock=None):
    return run_cli("fit", "--config", "configs/lora.yaml", "--config", str(data / "every_n.yaml"),
                   "--model.base_model", str(tiny_model_dir), "--model.quantization", "none",
                   "--model.precision", "fp32", "--model.warmup_steps", str(WARMUP), "--model.learning_rate", str(LR),
                   "--model.min_lr_ratio", str(FLOOR), "--data.batch_size", "2",
                   "--data.train_file", str(data / "train.jsonl"), "--data.val_file", str(data / "val.jsonl"),
                   "--trainer.max_epochs", "2", "--trainer.max_time", "00:00:15:00", "--trainer.log_every_n_steps", "1",
                   "--trainer.logger.init_args.save_dir", str(out / "runs"),
                   *probe("Clock", **(clock or {"train_s": 30.0, "val_s": 30.0})), *extra)


def side_by_side(*runs):
    """The results of independent runs (callables), started at once: a fit runs on one core (probes.run_cli), most
    of it importing, so two or three fill the 2 cores."""
    with ThreadPoolExecutor(len(runs)) as pool:
        return [future.result() for future in [pool.submit(run) for run in runs]]


def planned_total(output: str) -> int:
    match = re.search(r"planned (\d+) of the 40 steps, the cosine reaching its floor at step \1", output)
    assert match, output[-3000:]
    return int(match.group(1))


def test_a_fit_plans_its_steps_from_the_first_ones_ends_there_and_resumes_with_the_same_plan(tiny_model_dir, data,
                                                                                             tmp_path):
    # the whole run, beside it the same run killed after the plan (resumed from step 9 below), and one whose steps
    # get twice as fast after the timed ones (checked at the end)
    result, killed, faster = side_by_side(
        lambda: budget_fit(tiny_model_dir, data, tmp_path / "whole"),
        lambda: budget_fit(tiny_model_dir, data, tmp_path / "resumed", *probe("SignalAt", step=10)),
        lambda: budget_fit(tiny_model_dir, data, tmp_path / "faster",
                           clock={"train_s": 30.0, "val_s": 30.0, "later_s": 15.0, "after": MEASURED_STEPS + 1}))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert re.search(r"expected training time on this CPU: about .* for 40 optimizer steps", output)
    # 900 s of budget at 30 s per step (a little more or less by the tokens of the timed steps) and 60 s per
    # validation (2 batches), real time on top: about 22 of the 40 steps
    total = planned_total(output)
    assert 12 <= total <= 27
    run = tmp_path / "whole" / "runs" / "lora" / "version_0"
    logged = scalars(run)
    lrs = dict(logged["lr-AdamW"])
    assert max(lrs) == total - 1, "\n".join(re.findall("time budget.*", output))  # the last optimizer step is the planned one ...
    assert lrs[total - 1] == pytest.approx(LR * CosineToFloor(WARMUP, total, FLOOR)(total - 1), rel=1e-6)
    assert lrs[5] == pytest.approx(LR * CosineToFloor(WARMUP, total, FLOOR)(5), rel=1e-6)  # the cosine is the plan's
    # ... the fit validated there before it ended (and at the end of epoch 1 if the plan went past it)
    assert len(logged["val/ppl"]) == validations(MEASURED_STEPS + 1, total, every=20)
    assert json.loads((run / "lora_adapter_best" / "medassist.json").read_text())["step"] == total
    assert "measured at step" not in output  # (what a run stopped between validations says)
    assert "Time limit reached" not in output  # the plan ended it, not Lightning's timer
    assert "re-planned" not in output  # steady steps: the checks on the way keep the plan

    # the killed run's saved plan is kept (its own, measured on its own first steps: real time may move it a step
    # from the run above), and the resumed run ends there on that cosine
    assert killed.returncode == -signal.SIGKILL
    saved = planned_total(killed.stdout + killed.stderr)
    resumed = budget_fit(tiny_model_dir, data, tmp_path / "resumed", "--ckpt_path", "last")
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, output[-3000:]
    assert f"resuming the saved plan of {saved} optimizer steps" in output
    again = dict(scalars(tmp_path / "resumed" / "runs" / "lora" / "version_0")["lr-AdamW"])
    assert max(again) == saved - 1
    for step in (5, 9, saved - 1):  # before the kill, after the resume, the last step: all on the saved plan's cosine
        assert again[step] == pytest.approx(LR * CosineToFloor(WARMUP, saved, FLOOR)(step), rel=1e-6)

    # resumed once more without a budget: the plan no longer applies, the run trains on to the configured 40 steps
    unlimited = budget_fit(tiny_model_dir, data, tmp_path / "resumed", "--ckpt_path", "last",
                           "--trainer.max_time", "null")
    output = unlimited.stdout + unlimited.stderr
    assert unlimited.returncode == 0, output[-3000:]
    assert "no budget now: the cosine runs over all of them" in output
    assert max(dict(scalars(tmp_path / "resumed" / "runs" / "lora" / "version_0")["lr-AdamW"])) == 39

    # the run that sped up: planned like the first from steps 2-4, re-planned a third of the way on the faster
    # steps (to about twice as many of what was left), and ended on the re-planned cosine within the budget
    output = faster.stdout + faster.stderr
    assert faster.returncode == 0, output[-3000:]
    first = planned_total(output)
    assert abs(first - total) <= 2
    replans = re.findall(r"over steps 5-(\d+); re-planned (?:all )?(\d+)(?: of the 40)? steps \(was (\d+)\)", output)
    assert replans and int(replans[0][2]) == first and int(replans[0][0]) == MEASURED_STEPS + 1 + (first - 4) // 3
    final = int(replans[-1][1])
    assert final >= first + 5
    lrs = dict(scalars(tmp_path / "faster" / "runs" / "lora" / "version_0")["lr-AdamW"])
    assert max(lrs) == final - 1
    assert lrs[final - 1] == pytest.approx(LR * CosineToFloor(WARMUP, final, FLOOR)(final - 1), rel=1e-6)
    assert lrs[5] == pytest.approx(LR * CosineToFloor(WARMUP, first, FLOOR)(5), rel=1e-6)  # before: the first plan
    assert "Time limit reached" not in output
