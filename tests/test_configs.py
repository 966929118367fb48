"""Every shipped YAML parses through the real CLI, and resolves to exactly what it says: lora.yaml alone, every other
config as a layer over it (`--config configs/lora.yaml --config configs/X.yaml`) that changes only its own keys."""

from pathlib import Path

import pytest
import yaml

from medassist.cli import main

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def resolved(capsys, *configs) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *(a for c in configs for a in ("--config", str(c))), "--print_config"])
    out, err = capsys.readouterr()
    assert exit_info.value.code in (0, None), err
    return yaml.safe_load(out[out.index("seed_everything:"):])  # DeepSpeed prints a banner when imported


def layered(base, layer):
    """`base` with `layer` on top, as jsonargparse layers configs: mappings merge (a class_path's init_args too,
    when the class stays), `key+:` appends to the list (or the one value) below, anything else is replaced."""
    if not (isinstance(base, dict) and isinstance(layer, dict)) or base.get("class_path", layer.get("class_path")) \
            != layer.get("class_path", base.get("class_path")):
        return layer
    appended = {k[:-1]: (base[k[:-1]] if isinstance(base[k[:-1]], list) else [base[k[:-1]]]) + v
                for k, v in layer.items() if k.endswith("+")}
    return {**base, **{k: layered(base[k], v) if k in base else v for k, v in layer.items() if not k.endswith("+")},
            **appended}


def contains(printed, expected, where="") -> None:
    """Every value given in `expected` is in `printed` at the same place (printed adds the defaults)."""
    if isinstance(expected, dict):
        assert isinstance(printed, dict), where
        for key, value in expected.items():
            assert key in printed, f"{where}.{key} missing"
            contains(printed[key], value, f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(printed, list) and len(printed) == len(expected), where
        for i, (p, e) in enumerate(zip(printed, expected)):
            contains(p, e, f"{where}[{i}]")
    else:
        assert printed == expected, f"{where}: {printed!r} != {expected!r}"


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_resolves_to_what_it_says(config, capsys, monkeypatch):
    monkeypatch.chdir(config.parents[1])
    lora = config.parent / "lora.yaml"
    source = yaml.safe_load(config.read_text())
    if config == lora:
        printed = resolved(capsys, lora)
        contains(printed, source)
    else:
        alone = resolved(capsys, lora)
        printed = resolved(capsys, lora, config)
        contains(printed, layered(alone, source))
        assert "callbacks" in source["trainer"] or printed["trainer"]["callbacks"] == alone["trainer"]["callbacks"]
    # Said once: data.base_model is linked to the model's (LightningCLI leaves linked targets out of the printout).
    assert "base_model" not in printed["data"]
    assert printed["model"]["base_model"] == ("google/gemma-2b" if config.name == "gemma-2b.yaml" else "embedded")
    logger = printed["trainer"]["logger"]
    logger = logger[0] if isinstance(logger, list) else logger  # mlflow.yaml, wandb.yaml: TensorBoard + a tracker
    assert logger["class_path"].endswith("TensorBoardLogger")
    assert logger["init_args"]["name"] == {"lora.yaml": "lora", "medquad.yaml": "medquad",
                                                                 "gemma-2b.yaml": "gemma-2b",
                                                                 "medquad-grounded.yaml": "medquad-grounded",
                                                                 }.get(config.name, "lora")
