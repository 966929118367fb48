"""Every shipped YAML parses through the real CLI (strategy configs layered on configs/lora.yaml)."""

from pathlib import Path

import pytest
import yaml

from medassist.cli import main

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_parses(config, capsys, monkeypatch):
    monkeypatch.chdir(config.parents[1])
    layered = "strategy" in (yaml.safe_load(config.read_text()).get("trainer") or {})  # a layer over lora.yaml
    args = ["fit", *(["--config", "configs/lora.yaml"] if layered else []), "--config", str(config), "--print_config"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code in (0, None), capsys.readouterr().err
    out = capsys.readouterr().out
    printed = yaml.safe_load(out[out.index("seed_everything:"):])  # DeepSpeed prints a banner when imported
    assert printed["model"]["base_model"] and printed["trainer"]["logger"]  # data.base_model is linked to it
