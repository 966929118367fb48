"""The real entry point, `python -m medassist fit ...`, in a subprocess: outputs, resume, and bad input."""

import json
import re
import os
from pathlib import Path

import pytest
import torch
from probes import run_cli

ROOT = Path(__file__).resolve().parents[1]


def small_data(tmp_path, n_train=16, n_val=4):
    lines = (ROOT / "data" / "train.jsonl").read_text().splitlines()
    (tmp_path / "train.jsonl").write_text("\n".join(lines[:n_train]) + "\n")
    (tmp_path / "val.jsonl").write_text("\n".join(lines[n_train:n_train + n_val]) + "\n")
    return str(tmp_path / "train.jsonl"), str(tmp_path / "val.jsonl")


def scalars(run_dir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir)).Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def tiny_fit_args(tiny_model_dir, tmp_path, *extra):
    train, val = small_data(tmp_path)
    return ["fit", "--config", "configs/lora.yaml", "--model.base_model", str(tiny_model_dir),
            "--model.quantization", "none", "--model.precision", "fp32",
            "--data.train_file", train, "--data.val_file", val, "--data.batch_size", "4",
            "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.max_epochs", "1",
            "--trainer.log_every_n_steps", "1", *extra]


def test_fit_writes_adapter_small_checkpoints_config_and_scalars_then_resumes(tiny_model_dir, tmp_path):
    result = run_cli(*tiny_fit_args(tiny_model_dir, tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "lora" / "version_0"
    adapter = run / "lora_adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "medassist.json"} <= {p.name for p in adapter.iterdir()}
    assert (run / "lora_adapter_best" / "adapter_model.safetensors").exists()
    assert (run / "config.yaml").exists()
    last = run / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=False)
    assert state["global_step"] == 4 and all("lora_" in k for k in state["state_dict"])
    assert last.stat().st_size < 3 * 2**20  # the adapter and its optimizer state, not the base
    tags = scalars(run)
    for tag in ("train/loss", "val/loss", "val/ppl", "lr-AdamW", "train/tokens_per_s", "train/response_tokens_per_s"):
        assert tag in tags, (tag, sorted(tags))
    assert "validation perplexity: base" in result.stdout + result.stderr
    assert "measured at step" not in result.stdout + result.stderr  # validated at the last step

    resumed = run_cli(*tiny_fit_args(tiny_model_dir, tmp_path, "--trainer.max_epochs", "2", "--ckpt_path", "last"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {last}" in resumed.stderr
    assert not (tmp_path / "runs" / "lora" / "version_1").exists()  # the same run continues
    assert torch.load(last, weights_only=False)["global_step"] == 8
    assert max(step for step, _ in scalars(run)["train/loss"]) >= 7
    assert "was written with" not in resumed.stderr  # same devices and batch size: an exact continuation
    # the first run's time budget planned its 4 steps; 8 now: the plan is made again, not kept
    assert re.search(r"the saved plan was made for 4 optimizer steps .*; this run has 8 .*: planning again", resumed.stderr)
    # stderr is a pipe, not a terminal: a plain progress line every 5 optimizer steps, counted from the resume
    progress = re.search(r"step 5/8 \(epoch 2\): loss \d+\.\d{3}, \d+ tokens/s, elapsed 0:00:\d\d, ETA 0:00:\d\d",
                         resumed.stdout + resumed.stderr)
    assert progress, (resumed.stdout + resumed.stderr)[-3000:]
    assert "step 5/" not in result.stdout + result.stderr  # the first run had 4 steps only

    other_batch = run_cli(*tiny_fit_args(tiny_model_dir, tmp_path, "--trainer.max_epochs", "3", "--ckpt_path", "last",
                                         "--data.batch_size", "2"))
    assert other_batch.returncode == 0, other_batch.stderr[-3000:]
    assert "was written with 1 device(s) x batch 4; this run has 1 x 2" in other_batch.stderr


def test_stopping_between_validations_says_which_step_the_perplexity_is_from(tiny_model_dir, tmp_path):
    # what a run cut short by trainer.max_time (configs/medquad.yaml) looks like: last validation at step 2, stop at 3
    result = run_cli(*tiny_fit_args(tiny_model_dir, tmp_path, "--trainer.max_epochs", "-1", "--trainer.max_steps", "3",
                                    "--trainer.val_check_interval", "2"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(measured at step 2; the adapter is from step 3)" in result.stdout + result.stderr
    run = tmp_path / "runs" / "lora" / "version_0"
    assert json.loads((run / "lora_adapter" / "medassist.json").read_text())["step"] == 3
    assert json.loads((run / "lora_adapter_best" / "medassist.json").read_text())["step"] == 2


def test_unknown_config_key_is_a_clear_error(tmp_path):
    result = run_cli("fit", "--config", "configs/lora.yaml", "--model.lora_rank", "8")
    assert result.returncode == 2
    assert "lora_rank" in result.stderr and "Traceback" not in result.stderr


def test_bad_data_line_fails_before_loading_a_model(tmp_path):
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"instruction": "q", "output": "a"}\n{"instruction": "q"\n')
    result = run_cli("fit", "--config", "configs/lora.yaml", "--data.train_file", str(bad),
                     "--model.base_model", str(tmp_path / "no-such-model"))
    assert result.returncode == 2
    assert f"{bad}:2: not valid JSON" in result.stderr and "Traceback" not in result.stderr


def test_missing_model_source_names_what_was_tried(tmp_path):
    train, val = small_data(tmp_path)
    result = run_cli("fit", "--config", "configs/lora.yaml", "--model.base_model", "./models/nothing-here",
                     "--data.train_file", train, "--data.val_file", val,
                     "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "model source './models/nothing-here' not found" in result.stderr and "embedded" in result.stderr


@pytest.mark.slow
def test_main_command_on_the_embedded_gemma_3_270m(tmp_path):
    """The README's main command, shortened: real pretrained weights, int8, through the CLI."""
    result = run_cli("fit", "--config", "configs/lora.yaml", "--trainer.limit_train_batches", "2",
                     "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "2", "--data.batch_size", "2",
                     "--trainer.num_sanity_val_steps", "2", "--trainer.log_every_n_steps", "1",
                     "--trainer.logger.init_args.save_dir",
                     str(tmp_path / "runs"), timeout=900,
                     env={"OMP_NUM_THREADS": str(os.cpu_count() or 1)})  # the real model: every core, as the README
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "lora" / "version_0"
    config = json.loads((run / "lora_adapter" / "adapter_config.json").read_text())
    assert config["r"] == 16 and (run / "lora_adapter" / "adapter_model.safetensors").stat().st_size > 1e6
    tags = scalars(run)
    assert {"train/loss", "val/ppl", "val/loss"} <= set(tags)
    assert 1 < tags["val/ppl"][-1][1] < 100  # a pretrained model, not random weights (262k vocabulary)
