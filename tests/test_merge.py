"""`python -m medassist merge` on the tiny model: merged logits equal base + adapter, the directory loads with plain
transformers in a fresh process, and --out is never half-written or silently overwritten."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from medassist.merge import main, merge
from medassist.prompts import TEMPLATE_NAME, encode_prompt, format_prompt

ROOT = Path(__file__).resolve().parents[1]


def test_merged_logits_equal_base_plus_adapter(adapter, tiny_model_dir, tiny_tokenizer, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from medassist.loading import load_model

    out = merge(str(adapter), str(tmp_path / "merged"), dtype="fp32")
    ids = torch.tensor([encode_prompt(tiny_tokenizer, "What are the symptoms of asthma in children?")])
    unmerged = PeftModel.from_pretrained(load_model(str(tiny_model_dir), quantization="none", precision="fp32"),
                                         str(adapter)).eval()
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = unmerged(input_ids=ids).logits
        with unmerged.disable_adapter():
            base = unmerged(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    assert (expected - base).abs().max() > 1e-2  # the adapter changes the output, so the comparison means something
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_cli_writes_a_directory_that_plain_transformers_loads_in_a_fresh_process(adapter, tmp_path):
    out = tmp_path / "exports" / "medassist-tiny"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, "-m", "medassist", "merge", "--adapter", str(adapter), "--out", str(out),
                             "--dtype", "bf16"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "medassist.json",
            "README.md"} <= {p.name for p in out.iterdir()}
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary directory left behind
    card = (out / "README.md").read_text()
    assert "NOT part of these weights" in card and "medassist serve" in card and str(adapter) in card
    assert json.loads((out / "medassist.json").read_text())["template"] == TEMPLATE_NAME
    assert format_prompt("What is asthma?").replace("\n", "\\n") in card  # the raw-use example: our template

    # Only transformers in the fresh process: nothing from medassist is needed to load the export.
    code = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
ids = tok("<start_of_turn>user\\nWhat is flu?<end_of_turn>\\n<start_of_turn>model\\n", return_tensors="pt")
new = model.generate(**ids, max_new_tokens=3, do_sample=False)[0, ids.input_ids.shape[1]:]
print(json.dumps({"dtype": str(model.dtype), "eos": model.generation_config.eos_token_id,
                  "end_of_turn": tok.convert_tokens_to_ids("<end_of_turn>"), "new": len(new),
                  "medassist": "medassist" in sys.modules}))
"""
    loaded = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=300,
                            cwd=out.parent, env=env)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    facts = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert facts["dtype"] == "torch.bfloat16" and facts["end_of_turn"] in facts["eos"]
    assert 1 <= facts["new"] <= 3 and not facts["medassist"]


def test_out_is_never_overwritten_without_force_and_bad_input_writes_nothing(adapter, tmp_path, capsys):
    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert main(["--adapter", str(adapter), "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err and (out / "keep.txt").read_text() == "precious"

    assert main(["--adapter", str(tmp_path), "--out", str(tmp_path / "new")]) == 2
    assert "not a LoRA adapter directory" in capsys.readouterr().err and not (tmp_path / "new").exists()
    assert main(["--adapter", str(adapter), "--out", str(adapter.parent), "--force"]) == 2
    assert "contains the adapter" in capsys.readouterr().err and adapter.is_dir()

    assert main(["--adapter", str(adapter), "--out", str(out), "--force", "--dtype", "fp32"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # the old copy and the temp dir are gone
