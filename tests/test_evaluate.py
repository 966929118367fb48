"""The evaluator on a tiny model: its perplexity is Lightning validation's, the script end to end, SampleAnswers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from medassist.data import InstructionDataModule, read_records
from medassist.callbacks import SampleAnswers
from medassist.evaluate import load_lm, perplexity
from medassist.loading import load_tokenizer
from medassist.model import MedAssistLM

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("data")
    lines = (ROOT / "data" / "validation.jsonl").read_text().splitlines()
    (tmp / "train.jsonl").write_text("\n".join(lines[:8]) + "\n")
    (tmp / "val.jsonl").write_text("\n".join(lines[8:19]) + "\n")  # 11: the last batch is short, as it may be
    return tmp / "train.jsonl", tmp / "val.jsonl"


def trained_module(tiny_model_dir, quantization):
    """A module whose LoRA is not zero (as after training), and its adapter saved in peft format."""
    module = MedAssistLM(base_model=str(tiny_model_dir), quantization=quantization, precision="fp32")
    module.configure_model()
    torch.manual_seed(0)
    for name, param in module.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    return module


@pytest.mark.parametrize("quantization", ["none", "int8"])
@pytest.mark.parametrize("with_adapter", [False, True])
def test_perplexity_equals_lightning_validation(tiny_model_dir, files, tmp_path, quantization, with_adapter):
    train, val = files
    module = trained_module(tiny_model_dir, quantization) if with_adapter else \
        MedAssistLM(base_model=str(tiny_model_dir), quantization=quantization, precision="fp32")
    adapter = module.save_adapter(tmp_path / "lora_adapter") if with_adapter else None
    data = InstructionDataModule(base_model=str(tiny_model_dir), train_file=str(train), val_file=str(val),
                                 max_seq_length=64, batch_size=4)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    [validated] = trainer.validate(module, datamodule=data, verbose=False)

    lm = load_lm(str(tiny_model_dir), adapter and str(adapter), quantization, "fp32", "cpu")
    ours = perplexity(lm, load_tokenizer(str(tiny_model_dir)), read_records(val), max_seq_length=64, batch_size=4)
    assert ours["perplexity"] == pytest.approx(validated["val/ppl"], rel=1e-5)
    assert ours["response_tokens"] > 11 * 5


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    return trained_module(tiny_model_dir, "none").save_adapter(tmp_path_factory.mktemp("run") / "lora_adapter")


def run_script(*args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=env)


def test_evaluate_script_compares_base_and_fine_tuned(tiny_model_dir, adapter, files, tmp_path):
    # 4 validation pairs and one emergency question: the flags report has something to count
    emergency = {"instruction": "My father has crushing chest pain and is sweating, what should I do?",
                 "output": "Call your local emergency number now."}
    val = tmp_path / "val.jsonl"
    val.write_text("".join(files[1].read_text().splitlines(keepends=True)[:4]) + json.dumps(emergency) + "\n")
    result = run_script("--adapter", adapter, "--base-model", tiny_model_dir, "--data", val, "--limit", 5,
                        "--max-new-tokens", 8, "--compare-base", "--output", tmp_path / "report.json",
                        "--tensorboard", tmp_path / "tb", "--quantization", "none", "--precision", "fp32")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["examples"] == 5 and list(report["results"]) == ["base", "fine-tuned"]
    for name, r in report["results"].items():
        assert r["perplexity"] > 1 and r["response_tokens"] > 0
        assert set(r["rougeL"]) == {"fmeasure", "precision", "recall"} and 0 <= r["rougeL"]["fmeasure"] <= 1
        assert r["answered"] + r["errors"] == 5 and len(r["answers"]) == 5
        from collections import Counter

        assert r["flags"] == dict(Counter(f for a in r["answers"] for f in a.get("flags", [])))  # the answers' sum
        assert r["flags"]["emergency"] >= 1 and "emergency" in r["answers"][4]["flags"]
        assert {"answer", "reference", "flags", "rougeL"} <= set(r["answers"][0])
    assert report["results"]["base"]["perplexity"] != report["results"]["fine-tuned"]["perplexity"]
    assert set(report["comparison"]) == {"perplexity_change", "rougeL_f_change"}
    assert report["results"]["fine-tuned"]["adapter"] == str(adapter) and report["hardware"]["cpu"]
    png = (tmp_path / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    assert {"eval/base/perplexity", "eval/fine-tuned/perplexity", "eval/fine-tuned/rougeL_f"} <= set(
        events.Tags()["scalars"])


def test_evaluate_script_base_alone_perplexity_only(tiny_model_dir, files, tmp_path):
    _, val = files
    result = run_script("--base-model", tiny_model_dir, "--data", val, "--max-new-tokens", 0,
                        "--output", tmp_path / "base.json", "--quantization", "none")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "base.json").read_text())
    assert list(report["results"]) == ["base"] and "rougeL" not in report["results"]["base"]
    assert report["examples"] == 11 and not (tmp_path / "base.png").exists()



def test_evaluate_script_bad_input_is_a_clear_error(tiny_model_dir, files, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("evaluate_script", ROOT / "scripts" / "evaluate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "q", "output": "a"}\n{"instruction": "q"}\n')
    out = str(tmp_path / "x.json")
    assert script.main(["--base-model", str(tiny_model_dir), "--data", str(bad), "--output", out]) == 2
    assert f"{bad}:2: missing 'output'" in capsys.readouterr().err and not (tmp_path / "x.json").exists()
    assert script.main(["--adapter", str(tmp_path), "--data", str(files[1]), "--output", out]) == 2
    assert "not a LoRA adapter directory" in capsys.readouterr().err


def test_sample_answers_logs_text_at_each_validation_without_touching_the_rng(tiny_model_dir, files, tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train, val = files
    questions = ["What is asthma?", "How can I sleep better?"]

    def fit(callbacks, name):
        torch.manual_seed(0)
        data = InstructionDataModule(base_model=str(tiny_model_dir), train_file=str(train), val_file=str(val),
                                     max_seq_length=64, batch_size=4)
        module = MedAssistLM(base_model=str(tiny_model_dir), quantization="int8", precision="fp32", lora_dropout=0.1)
        logger = TensorBoardLogger(tmp_path, name=name)
        trainer = L.Trainer(accelerator="cpu", logger=logger, max_steps=4, val_check_interval=2,
                            num_sanity_val_steps=1, limit_val_batches=1, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                            log_every_n_steps=1)
        trainer.fit(module, datamodule=data)
        return EventAccumulator(logger.log_dir, size_guidance={"tensors": 0}).Reload(), torch.rand(1)

    events, after = fit([SampleAnswers(questions, every_n_validations=2, max_new_tokens=6)], "with")
    steps = {tag: [e.step for e in events.Tensors(tag)] for tag in events.Tags()["tensors"]
             if tag.startswith("samples")}
    # before training (step 0), then every 2nd validation: validations at steps 2 and 4 -> only step 4
    assert steps == {"samples/0/text_summary": [0, 4], "samples/1/text_summary": [0, 4]}
    text = events.Tensors("samples/1/text_summary")[0].tensor_proto.string_val[0].decode()
    assert text.startswith("**Q:** How can I sleep better?") and "**A:**" in text

    plain, plain_after = fit([], "without")  # dropout draws from the RNG: the same run, sampled answers or not
    loss = [e.value for e in events.Scalars("train/loss")]
    assert loss == [e.value for e in plain.Scalars("train/loss")] and torch.equal(after, plain_after)


def test_perplexity_truncates_as_the_training_run_did(tmp_path):
    from medassist.evaluate import spread, training_setting

    (tmp_path / "lora_adapter").mkdir()
    (tmp_path / "config.yaml").write_text("data:\n  max_seq_length: 77\n  batch_size: 3\n")
    assert training_setting(str(tmp_path / "lora_adapter"), "max_seq_length") == 77
    assert training_setting(None, "max_seq_length") is None
    assert training_setting(str(tmp_path / "elsewhere" / "lora_adapter"), "max_seq_length") is None
    assert spread(list(range(10)), 3) == [0, 3, 6] and spread([1, 2], 5) == [1, 2]  # --limit: evenly spaced


def test_medquad_recipe_layers_on_lora_yaml_and_keeps_its_callbacks():
    import yaml

    result = subprocess.run([sys.executable, "-m", "medassist", "fit", "--config", "configs/lora.yaml", "--config",
                             "configs/medquad.yaml", "--print_config"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    config = yaml.safe_load(result.stdout)
    callbacks = [c["class_path"] for c in config["trainer"]["callbacks"]]
    assert callbacks.count("lightning.pytorch.callbacks.ModelCheckpoint") == 1  # lora.yaml's last.ckpt is kept
    assert callbacks.count("medassist.callbacks.SampleAnswers") == 1 and callbacks[-1] == "medassist.callbacks.SampleAnswers"
    # where README's import writes it: python -m medassist.data import medquad ... --out data/medquad/
    assert config["data"]["train_file"] == "data/medquad/train.jsonl" and config["trainer"]["max_steps"] > 0
    SampleAnswers(**config["trainer"]["callbacks"][-1]["init_args"])
