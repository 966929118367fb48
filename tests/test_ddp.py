"""Multi-device: real DDP with 2 CPU processes (gloo) through the real CLI, against 1 process with the same global
batch; the layered strategy configs; int8 + FSDP refused; the FSDP wrap policy. FSDP and DeepSpeed themselves need
GPUs (Lightning refuses them on a CPU), so only their configs and our checks run here.
"""

import re
import signal
from pathlib import Path

import pytest
import torch
import yaml
from probes import ROOT, by_process, probe, read_jsonl, run_cli, write_data

STEPS = 12  # 40 examples / global batch 4 = 10 steps per epoch: the run crosses into epoch 1 and validates


def fit_args(tiny_model_dir, data, out: Path, *extra):
    return ["fit", "--config", "configs/lora.yaml", *extra,
            "--model.base_model", str(tiny_model_dir), "--model.quantization", "none", "--model.precision", "fp32",
            "--model.lora_dropout", "0", "--data.train_file", str(data / "train.jsonl"),
            "--data.val_file", str(data / "val.jsonl"), "--trainer.accelerator", "cpu",
            "--trainer.max_steps", str(STEPS), "--trainer.log_every_n_steps", "1",
            "--trainer.logger.init_args.save_dir", str(out / "runs"), *probe("RecordBatches", out=out)]


def adapter(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "lora_adapter" / "adapter_model.safetensors")


def base_ppl(output: str) -> float:
    return float(re.search(r"validation perplexity before training: ([\d.]+)", output).group(1))


def scalars(run_dir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir)).Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("data"), every_n_steps=3)


@pytest.fixture(scope="module")
def single(tiny_model_dir, data, tmp_path_factory):
    """One process, batch 4: (its output directory, the finished process)."""
    one = tmp_path_factory.mktemp("one")
    result = run_cli(*fit_args(tiny_model_dir, data, one, "--data.batch_size", "4"))
    assert result.returncode == 0, result.stderr[-3000:]
    return one, result


def test_two_processes_train_like_one_with_the_same_global_batch(tiny_model_dir, data, single, tmp_path):
    (one, single), two = single, tmp_path / "two"
    ddp = run_cli(*fit_args(tiny_model_dir, data, two, "--config", "configs/ddp.yaml", "--trainer.devices", "2",
                            "--data.batch_size", "2"))
    assert ddp.returncode == 0, ddp.stderr[-3000:]

    ranks = [read_jsonl(two / f"rank{r}.jsonl") for r in (0, 1)]
    alone = read_jsonl(one / "rank0.jsonl")
    assert len(alone) == len(ranks[0]) == len(ranks[1]) == STEPS
    assert ranks[0][0]["pid"] != ranks[1][0]["pid"]
    for r0, r1, r in zip(*ranks, alone):
        assert not set(r0["examples"]) & set(r1["examples"])  # each rank its own share ...
        assert sorted(r0["examples"] + r1["examples"]) == sorted(r["examples"])  # ... of the same global batch
    first_epoch = [i for rows in ranks for row in rows[:10] for i in row["examples"]]
    assert sorted(first_epoch) == list(range(40))  # an epoch sees every example once
    assert ranks[0][10]["epoch"] == 1 and ranks[0][10]["examples"] != ranks[0][0]["examples"]  # set_epoch reached
    assert {row["checkpoint_io"] for rows in ranks for row in rows} == {"AtomicCheckpointIO"}

    # The logged loss is the mean of the two ranks' losses; only rank 0 writes logs, checkpoints and adapters.
    run = two / "runs" / "lora" / "version_0"
    logged = [value for _, value in scalars(run)["train/loss"]]
    assert logged == pytest.approx([(a["loss"] + b["loss"]) / 2 for a, b in zip(*ranks)], rel=1e-5)
    assert sorted(p.name for p in (two / "runs" / "lora").iterdir()) == ["version_0"]
    assert len(list(run.glob("events.out.tfevents.*"))) == 1
    assert (run / "lora_adapter_best").is_dir() and (run / "checkpoints" / "last.ckpt").is_file()
    assert not list(run.rglob(".*tmp*"))
    assert (ddp.stdout + ddp.stderr).count("adapter saved to") == 1
    # Validation is split across ranks and its metric synced: the same perplexity as one process.
    assert base_ppl(ddp.stdout + ddp.stderr) == pytest.approx(base_ppl(single.stdout + single.stderr), rel=1e-5)

    single_adapter, ddp_adapter = adapter(one / "runs" / "lora" / "version_0"), adapter(run)
    assert single_adapter.keys() == ddp_adapter.keys()
    for name in single_adapter:
        torch.testing.assert_close(ddp_adapter[name], single_adapter[name], rtol=1e-4, atol=1e-6, msg=name)


def test_two_processes_accumulating_two_batches_of_1_train_like_one_with_batch_4(tiny_model_dir, data, single,
                                                                                   tmp_path):
    """Per-token weighting over the whole accumulation window, on all ranks: every optimizer step sees the same 4
    examples as one process with batch 4, in 4 micro-batches of different token counts, and ends at the same adapter."""
    one, _ = single
    ddp = run_cli(*fit_args(tiny_model_dir, data, tmp_path, "--config", "configs/ddp.yaml", "--trainer.devices", "2",
                            "--data.batch_size", "1", "--trainer.accumulate_grad_batches", "2"))
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    ranks = [read_jsonl(tmp_path / f"rank{r}.jsonl") for r in (0, 1)]
    alone = read_jsonl(one / "rank0.jsonl")
    assert len(ranks[0]) == len(ranks[1]) == 2 * STEPS
    for step, r in enumerate(alone):
        micro = [row for rows in ranks for row in rows[2 * step : 2 * step + 2]]
        assert sorted(i for row in micro for i in row["examples"]) == sorted(r["examples"]), step
    single_adapter, ddp_adapter = adapter(one / "runs" / "lora" / "version_0"), adapter(tmp_path / "runs" / "lora" /
                                                                                        "version_0")
    assert single_adapter.keys() == ddp_adapter.keys()
    for name in single_adapter:
        torch.testing.assert_close(ddp_adapter[name], single_adapter[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_sigterm_under_ddp_then_resume_matches_one_process(tiny_model_dir, data, tmp_path):
    """SIGTERM on one rank stops both after the same step, with one checkpoint; each rank's loader then resumes at its
    own place in its own shard, and the result is one process's."""
    one, two = tmp_path / "one", tmp_path / "two"
    single = run_cli(*fit_args(tiny_model_dir, data, one, "--data.batch_size", "4"))
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = ["--config", str(data / "every_n.yaml"), "--config", "configs/ddp.yaml", "--trainer.devices", "2",
           "--data.batch_size", "2"]
    stopped = run_cli(*fit_args(tiny_model_dir, data, two, *ddp, *probe("SignalAt", step=5, signal="SIGTERM",
                                                                        rank=1)))
    # 143 from rank 0; or SIGKILL when Lightning's child-process watcher sees rank 1 exit first and ends rank 0
    # (after the checkpoint: every rank leaves save_checkpoint through a barrier behind rank 0's write).
    assert stopped.returncode in (143, -signal.SIGKILL), stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr
    run = two / "runs" / "lora" / "version_0"
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 5
    resumed = run_cli(*fit_args(tiny_model_dir, data, two, *ddp, "--ckpt_path", "last"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for rank in (0, 1):
        first, second = by_process(read_jsonl(two / f"rank{rank}.jsonl"))
        assert [r["step"] for r in first] == [1, 2, 3, 4, 5] and [r["step"] for r in second] == list(range(6, 13))
    together = {}
    for row in read_jsonl(two / "rank0.jsonl") + read_jsonl(two / "rank1.jsonl"):
        together.setdefault(row["step"], []).extend(row["examples"])
    assert {step: sorted(examples) for step, examples in together.items()} == \
           {row["step"]: sorted(row["examples"]) for row in read_jsonl(one / "rank0.jsonl")}
    single_adapter, ddp_adapter = adapter(one / "runs" / "lora" / "version_0"), adapter(run)
    for name in single_adapter:
        torch.testing.assert_close(ddp_adapter[name], single_adapter[name], rtol=1e-4, atol=1e-6, msg=name)


def test_nan_on_one_rank_stops_every_rank_with_the_message(tiny_model_dir, data, tmp_path):
    result = run_cli(*fit_args(tiny_model_dir, data, tmp_path, "--config", "configs/ddp.yaml", "--trainer.devices",
                               "2", "--data.batch_size", "2", *probe("PoisonAt", step=3, rank=1)))
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.count("medassist: error: training loss is nan at step 3") == 2  # both ranks, same step
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs" / "lora" / "version_0" / "lora_adapter").exists()


def resolved_config(capsys, *configs, extra=()) -> dict:
    """The config the CLI would run with (parsed in-process, nothing instantiated)."""
    from medassist.cli import main

    with pytest.raises(SystemExit) as exit:
        main(["fit", *(a for c in configs for a in ("--config", str(ROOT / c))), *extra, "--print_config"])
    out = capsys.readouterr()
    assert exit.value.code in (0, None), out.err[-3000:]
    return yaml.safe_load(out.out[out.out.index("seed_everything:"):])  # DeepSpeed prints a banner first


@pytest.mark.parametrize("name", ["ddp", "fsdp", "deepspeed"])
def test_strategy_configs_layer_over_lora_yaml(name, capsys):
    alone = resolved_config(capsys, "configs/lora.yaml")
    layered = resolved_config(capsys, "configs/lora.yaml", f"configs/{name}.yaml")
    assert layered["data"] == alone["data"]
    assert layered["model"] == {**alone["model"], "quantization": "nf4" if name == "fsdp" else "int8"}
    assert layered["trainer"]["callbacks"] == alone["trainer"]["callbacks"]  # last.ckpt every N steps, still
    assert layered["trainer"]["strategy"]["class_path"].split(".")[-1].lower().startswith(name[:4])
    strategy = layered["trainer"]["strategy"]["init_args"]
    if name == "ddp":
        assert strategy["find_unused_parameters"] is False  # what the DDP test above runs with
    if name == "deepspeed":
        assert strategy["stage"] == 2 and strategy["exclude_frozen_parameters"] is True


def test_fsdp_config_builds_the_strategy_with_our_wrap_policy():
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import FSDPStrategy, Strategy

    from medassist.strategies import fsdp_wrap_policy

    parser = ArgumentParser()
    parser.add_argument("--strategy", type=Strategy)
    section = yaml.safe_load((ROOT / "configs" / "fsdp.yaml").read_text())["trainer"]["strategy"]
    strategy = parser.instantiate_classes(parser.parse_object({"strategy": section})).strategy
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.kwargs["auto_wrap_policy"] is fsdp_wrap_policy and strategy.kwargs["use_orig_params"]


def test_int8_with_fsdp_is_refused_before_anything_loads(tmp_path, capsys):
    from medassist.cli import main

    with pytest.raises(SystemExit) as exit:
        main(["fit", "--config", str(ROOT / "configs/lora.yaml"), "--config", str(ROOT / "configs/fsdp.yaml"),
              "--model.quantization", "int8", "--model.base_model", str(tmp_path / "no-such-model")])
    assert exit.value.code == 2
    assert "quantization int8 does not work with FSDP" in capsys.readouterr().err


def test_fsdp_wrap_policy_gives_every_unit_one_dtype(tiny_model_dir):
    """FSDP flattens each unit into one tensor: with nf4 stored as bf16 and fp32 adapters, the policy must split."""
    from medassist.model import MedAssistLM
    from medassist.strategies import fsdp_wrap_policy

    module = MedAssistLM(base_model=str(tiny_model_dir), quantization="nf4", precision="bf16")
    module.configure_model()
    units = [m for m in module.modules() if fsdp_wrap_policy(m, recurse=False, nonwrapped_numel=0)] + [module]
    unit_ids = {id(u) for u in units}
    flattened = {}
    for unit in units:  # what FSDP flattens for a unit: its weights that no unit inside it took
        taken = {id(p) for sub in unit.modules() if sub is not unit and id(sub) in unit_ids for p in sub.parameters()}
        dtypes = {p.dtype for p in unit.parameters() if id(p) not in taken}
        assert len(dtypes) <= 1, (type(unit).__name__, dtypes)
        flattened.setdefault(type(unit).__name__, set()).update(dtypes)
    assert sum(type(u).__name__ == "Gemma3DecoderLayer" for u in units) == 2
    assert flattened["Gemma3DecoderLayer"] == {torch.bfloat16} and flattened["Linear"] == {torch.float32}
