"""The usual knobs, from the config to the model: DoRA, rsLoRA, peft's initialisations, NEFTune, and experiment
tracking with MLflow and W&B beside TensorBoard (configs/mlflow.yaml, configs/wandb.yaml)."""

import json
import math
from pathlib import Path

import pytest
import torch

from medassist import UserError
from medassist.generate import load_for_generation
from medassist.model import MedAssistLM

ROOT = Path(__file__).resolve().parents[1]


def make_module(tiny_model_dir, **kwargs):
    kwargs = {"quantization": "none", "precision": "fp32", "lora_dropout": 0.0, **kwargs}
    module = MedAssistLM(base_model=str(tiny_model_dir), **kwargs)
    module.configure_model()
    return module


def lora_layers(module):
    """The peft LoRA layers of the module (each has lora_A, lora_B, scaling for the 'default' adapter)."""
    from peft.tuners.lora import LoraLayer

    return [m for m in module.modules() if isinstance(m, LoraLayer)]


def train_a_little(module) -> None:
    """Stand-in for training: move every adapter weight, so a saved adapter differs from its start."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def assert_answers_like_training(module, tmp_path, tiny_model_dir):
    """The saved adapter, loaded the way answering loads it (unquantized base + merged adapter), gives the logits
    of the model it was trained as."""
    module.eval()
    ids = torch.tensor([[2, 10, 20, 30, 40, 50]])
    adapter = module.save_adapter(tmp_path / "lora_adapter")
    merged, _, _ = load_for_generation(str(adapter), base_model=str(tiny_model_dir), precision="fp32")
    assert torch.allclose(logits(merged, ids), logits(module.model, ids), atol=1e-4)
    return adapter


def test_dora_adds_trained_magnitudes_and_its_adapter_loads_for_answering(tiny_model_dir, tmp_path):
    module = make_module(tiny_model_dir, use_dora=True)
    magnitudes = [n for n, p in module.named_parameters() if "lora_magnitude_vector" in n and p.requires_grad]
    assert len(magnitudes) == len(lora_layers(module)) > 0
    train_a_little(module)
    adapter = assert_answers_like_training(module, tmp_path, tiny_model_dir)
    assert '"use_dora": true' in (adapter / "adapter_config.json").read_text()


def test_rslora_scales_by_alpha_over_sqrt_r(tiny_model_dir):
    plain = make_module(tiny_model_dir, lora_r=4, lora_alpha=8)
    rs = make_module(tiny_model_dir, lora_r=4, lora_alpha=8, use_rslora=True)
    assert {m.scaling["default"] for m in lora_layers(plain)} == {8 / 4}
    assert {m.scaling["default"] for m in lora_layers(rs)} == {8 / math.sqrt(4)}


def test_gaussian_init_draws_a_from_a_normal_with_std_one_over_r(tiny_model_dir):
    # peft: True = Kaiming-uniform A (|a| <= 1/sqrt(fan_in)), 'gaussian' = normal A with std 1/r; B = 0 in both
    default = torch.cat([m.lora_A["default"].weight.flatten() for m in lora_layers(make_module(tiny_model_dir,
                                                                                                lora_r=4))])
    layers = lora_layers(make_module(tiny_model_dir, lora_r=4, init_lora_weights="gaussian"))
    gaussian = torch.cat([m.lora_A["default"].weight.flatten() for m in layers])
    fan_in = min(m.in_features for m in layers)
    assert default.abs().max() <= 1 / math.sqrt(fan_in) + 1e-6
    assert gaussian.std().item() == pytest.approx(1 / 4, rel=0.05)
    assert all(not m.lora_B["default"].weight.any() for m in layers)


def test_pissa_starts_from_the_principal_directions_and_saves_a_plain_lora(tiny_model_dir, tmp_path):
    base = make_module(tiny_model_dir)
    pissa = make_module(tiny_model_dir, lora_r=4, lora_alpha=8, init_lora_weights="pissa")
    ids = torch.tensor([[2, 10, 20, 30, 40, 50]])
    # peft: A and B hold the top-r singular directions, the base keeps the residual W - scaling B A: same function
    for layer, original in zip(lora_layers(pissa), lora_layers(base)):
        a, b, w = layer.lora_A["default"].weight, layer.lora_B["default"].weight, original.base_layer.weight
        assert a.any() and b.any()
        torch.testing.assert_close(layer.base_layer.weight + layer.scaling["default"] * b @ a, w, atol=1e-5, rtol=0)
        top = torch.linalg.svdvals(w)[:4]
        torch.testing.assert_close(torch.linalg.svdvals(layer.scaling["default"] * b @ a)[:4], top, atol=1e-4,
                                   rtol=1e-4)
    base.eval(), pissa.eval()
    assert torch.allclose(logits(pissa.model, ids), logits(base.model, ids), atol=1e-4)
    train_a_little(pissa)
    trainable = [n for n, p in pissa.named_parameters() if p.requires_grad]
    adapter = assert_answers_like_training(pissa, tmp_path, tiny_model_dir)  # on the original, unchanged base
    assert list(pissa.model.peft_config) == ["default"]  # the conversion's helper adapter is gone again,
    assert [n for n, p in pissa.named_parameters() if p.requires_grad] == trainable  # and training goes on as before
    config = (adapter / "adapter_config.json").read_text()
    assert '"r": 8' in config and '"init_lora_weights": true' in config  # peft's conversion: rank 2r, plain LoRA


def test_neftune_noises_embeddings_in_train_mode_only_with_alpha_over_sqrt_length_x_hidden(tiny_model_dir):
    module = make_module(tiny_model_dir, neftune_noise_alpha=5.0)
    embeddings = module.model.get_input_embeddings()
    ids = torch.randint(6, 300, (2, 50))
    module.eval()
    with torch.no_grad():
        clean = embeddings(ids)
        assert torch.equal(embeddings(ids), clean)  # validation and answering see no noise
        module.train()
        noise = embeddings(ids) - clean
    bound = 5.0 / math.sqrt(50 * clean.size(-1))  # uniform in [-bound, bound]: mean |noise| = bound / 2
    assert noise.abs().max() <= bound * (1 + 1e-4)
    assert noise.abs().mean().item() == pytest.approx(bound / 2, rel=0.05)
    nll = [module.response_nll({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})[0]
           for _ in range(2)]
    assert nll[0] != nll[1]  # the training loss sees fresh noise on every forward


@pytest.mark.parametrize("kwargs, words", [
    ({"init_lora_weights": "pissa", "quantization": "int8"}, "needs quantization: none"),
    ({"init_lora_weights": "pissa_niter_4", "quantization": "nf4"}, "--model.quantization none"),
    ({"init_lora_weights": "pissa", "quantization": "none", "use_dora": True}, "does not work with use_dora"),
    ({"init_lora_weights": "loftq", "quantization": "none"}, "LoftQ replaces the base weights"),
    ({"init_lora_weights": "eva"}, "must be true, false, 'gaussian', 'pissa' or 'pissa_niter_<n>'"),
    ({"neftune_noise_alpha": 0.0}, "neftune_noise_alpha must be positive"),
])
def test_combinations_that_cannot_work_are_refused_before_any_model_loads(kwargs, words):
    with pytest.raises(UserError, match=words.replace("(", r"\(").replace(")", r"\)")):
        MedAssistLM(base_model="./no-such-model", **kwargs)


def test_the_knobs_parse_from_the_command_line(capsys):
    import yaml

    from medassist.cli import main

    with pytest.raises(SystemExit):
        main(["fit", "--config", str(ROOT / "configs" / "lora.yaml"), "--model.use_dora", "true",
              "--model.use_rslora", "true", "--model.init_lora_weights", "gaussian",
              "--model.neftune_noise_alpha", "5", "--print_config"])
    out = capsys.readouterr().out
    model = yaml.safe_load(out[out.index("seed_everything:"):])["model"]
    assert (model["use_dora"], model["use_rslora"], model["init_lora_weights"], model["neftune_noise_alpha"]) \
        == (True, True, "gaussian", 5.0)


def test_fit_logs_to_tensorboard_mlflow_and_wandb_offline_at_once(tiny_model_dir, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    wandb = pytest.importorskip("wandb")
    from medassist.cli import main

    lines = (ROOT / "data" / "train.jsonl").read_text().splitlines()
    (tmp_path / "train.jsonl").write_text("\n".join(lines[:8]) + "\n")
    (tmp_path / "val.jsonl").write_text("\n".join(lines[8:12]) + "\n")
    # In this process (a subprocess would double the time), from tmp_path: the configs' relative checkpoints/ and
    # mlflow.db land there, as they would in a checkout
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_SILENT", "true")
    configs = [a for name in ("lora", "mlflow", "wandb") for a in ("--config", str(ROOT / "configs" / f"{name}.yaml"))]
    # only last.ckpt (for the resume below), not the sample answers
    configs += ["--trainer.callbacks", '[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", '
                                       '"init_args": {"save_last": true, "save_top_k": 0}}]']
    fit = ["fit", *configs, "--model.base_model", str(tiny_model_dir), "--model.quantization", "none",
           "--model.precision", "fp32", "--data.train_file", "train.jsonl", "--data.val_file", "val.jsonl",
           "--data.batch_size", "4", "--trainer.log_every_n_steps", "1"]
    main([*fit, "--trainer.max_epochs", "1"])
    wandb.finish()  # a CLI process finishes its W&B run at exit; this one goes on
    run_dir = tmp_path / "checkpoints" / "lora" / "version_0"  # TensorBoard, first, still names the run directory
    assert list(run_dir.glob("events.out.tfevents.*")) and (run_dir / "lora_adapter" / "adapter_config.json").exists()

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("medassist").experiment_id])
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in losses] == [0, 1] and all(math.isfinite(m.value) for m in losses)
    assert run.data.metrics["val/ppl"] > 1 and "val/loss" in run.data.metrics
    assert run.data.params["lora_r"] == "16"  # the hyperparameters too

    (offline,) = (tmp_path / "checkpoints" / "wandb").glob("offline-run-*")
    assert list(offline.glob("*.wandb"))  # `wandb sync` uploads this file later
    runs = json.loads((run_dir / "trackers.json").read_text())
    assert runs == {"MLFlowLogger": run.info.run_id, "WandbLogger": offline.name.rsplit("-", 1)[1]}

    # resumed: TensorBoard, MLflow and W&B all continue the runs they had, from the next step
    main([*fit, "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    wandb.finish()
    assert not (run_dir.parent / "version_1").exists()
    (again,) = client.search_runs([client.get_experiment_by_name("medassist").experiment_id])
    assert again.info.run_id == run.info.run_id
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [0, 1, 2, 3]
    # each W&B process writes its own offline folder; both carry the first run's id, so `wandb sync` joins them
    assert {d.name.rsplit("-", 1)[1] for d in (tmp_path / "checkpoints" / "wandb").glob("offline-run-*")} \
        == {runs["WandbLogger"]}


def test_ckpt_path_last_finds_the_tensorboard_run_when_a_tracker_is_layered_on(tmp_path):
    from jsonargparse import Namespace

    from medassist.cli import MedAssistCLI

    last = tmp_path / "lora" / "version_3" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.touch()
    board = Namespace(class_path="lightning.pytorch.loggers.TensorBoardLogger",
                      init_args=Namespace(save_dir=str(tmp_path), name="lora", version=None))
    tracker = Namespace(class_path="lightning.pytorch.loggers.MLFlowLogger", init_args=Namespace(save_dir="x"))
    config = Namespace(trainer=Namespace(logger=[board, tracker]), ckpt_path="last")
    MedAssistCLI._resolve_last(None, config)  # uses nothing of the CLI object
    assert (config.ckpt_path, board.init_args.version) == (str(last), "version_3")
