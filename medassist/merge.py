"""`python -m medassist merge`: fold a LoRA adapter into its base weights and write a plain transformers directory.

    python -m medassist merge --adapter checkpoints/lora/version_0/lora_adapter --out exports/medassist-270m

The directory holds safetensors, config, tokenizer, a generation config that stops at <end_of_turn>, medassist.json
(the prompt template) and a README.md model card. The safety layer is not in the weights: the card says so.
"""

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from medassist import UserError, __version__
from medassist.files import replace_dir
from medassist.generate import read_adapter_meta
from medassist.prompts import STOP_TOKENS, TEMPLATE_NAME, check_template, format_conversation, format_prompt, stop_ids

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def check(adapter: str, out: str, force: bool = False) -> list[str]:
    """Every problem with the paths at once, before a model loads."""
    problems = []
    try:
        read_adapter_meta(adapter)
    except UserError as e:
        problems.append(str(e))
    target = Path(out)
    if target.is_file():
        problems.append(f"--out {out} is a file; give a directory path")
    elif target.is_dir() and any(target.iterdir()) and not force:
        problems.append(f"--out {out} exists and is not empty; pick a new directory or pass --force to replace it")
    if target.exists() and Path(adapter).resolve().is_relative_to(target.resolve()):
        problems.append(f"--out {out} contains the adapter {adapter}; replacing it would delete the adapter")
    return problems


def merge(adapter: str, out: str, dtype: str = "bf16", base_model: str | None = None, force: bool = False,
          allow_template_mismatch: bool = False) -> Path:
    """Merge `adapter` into its base (loaded unquantized, merged in fp32) and write the result to `out` atomically."""
    from peft import PeftModel

    from medassist.loading import load_model, load_tokenizer

    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r} (fp16 overflows in Gemma)")
    if problems := check(adapter, out, force):
        raise UserError("; ".join(problems))
    meta = read_adapter_meta(adapter)
    if not allow_template_mismatch:
        check_template(meta.get("template"), adapter, "Merge with a matching medassist version, or pass "
                                                      "--allow-template-mismatch")
    base = base_model or meta.get("base_model") or "embedded"
    # Never merge into 8-bit weights: the adapter's update is far smaller than an int8 step, so rounding the merged
    # weight back to int8 would swallow most of it. Merge in fp32, then cast once, so bf16 output rounds the merged
    # weight and not each term.
    model = load_model(base, quantization="none", precision="fp32", device="cpu")
    tokenizer = load_tokenizer(base)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload().to(DTYPES[dtype])
    merged.config.use_cache = True  # load_model turns it off for training
    gen = merged.generation_config
    gen.eos_token_id = stop_ids(tokenizer)  # where medassist's own generation stops
    gen.pad_token_id, gen.bos_token_id = tokenizer.pad_token_id, tokenizer.bos_token_id

    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; an export is meant to be shared
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        info = {"template": TEMPLATE_NAME, "base_model": base, "adapter": str(adapter), "dtype": dtype,
                "adapter_meta": meta, "medassist_version": __version__}
        (tmp / "medassist.json").write_text(json.dumps(info, indent=2))
        (tmp / "README.md").write_text(model_card(base, Path(adapter), dtype, meta))
        for f in tmp.iterdir():
            f.chmod(0o644)
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed or killed merge leaves --out as it was
        raise
    return target


def training_data(adapter: Path) -> str:
    """The train/val files named in the run's config.yaml (LightningCLI writes it beside lora_adapter/)."""
    import yaml

    config = adapter.parent / "config.yaml"
    try:
        data = (yaml.safe_load(config.read_text()) or {}).get("data") or {}
    except (OSError, yaml.YAMLError):
        return "not recorded (no readable config.yaml beside the adapter)"
    files = [f"{key}: `{data[key]}`" for key in ("train_file", "val_file") if data.get(key)]
    return ", ".join(files) + f" (from `{config}`)" if files else "not recorded in config.yaml"


def model_card(base: str, adapter: Path, dtype: str, meta: dict) -> str:
    lora = json.loads((adapter / "adapter_config.json").read_text())
    prompt = format_prompt("{question}").replace("\n", "\\n")
    example = format_prompt("What is asthma?").replace("\n", "\\n")  # as a Python string literal in the card
    follow_up = format_conversation([{"role": "user", "content": "{question}"},
                                     {"role": "assistant", "content": "{answer}"},
                                     {"role": "user", "content": "{follow-up}"}]).replace("\n", "\\n")
    stops = " or ".join(f"`{t}`" for t in (*STOP_TOKENS, "<eos>"))
    trained_on = {"int8": "an 8-bit", "nf4": "a 4-bit NF4"}.get(meta.get("quantization"), "an unquantized")
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [medassist, lora, merged, health, education]
---
# medassist (merged)

A Gemma model fine-tuned with LoRA by medassist for short, educational answers to health questions, with the
adapter folded into the weights by `python -m medassist merge` (medassist {__version__}). Weights: {dtype}.

- **Base model:** `{base}`
- **Adapter:** `{adapter}` (step {meta.get("step", "?")}, r={lora.get("r")}, alpha={lora.get("lora_alpha")};
  trained on {trained_on} base, merged into the unquantized base)
- **Training data:** {training_data(adapter)}
- **Prompt template:** `{TEMPLATE_NAME}` (also in `medassist.json`): Gemma's turns, exactly
  `{prompt}` after the `<bos>` token for one question, and `{follow_up}` for a follow-up (a system message is put
  before the first user turn's text, after a blank line).
- **Stop:** generation ends at {stops} (`generation_config.json`).

## The safety layer is NOT part of these weights

Used directly (transformers, llama.cpp, any server), this model gives **no disclaimer, no emergency escalation,
and no removal of dose instructions, diagnoses or "I am a doctor" claims**: those come from medassist's safety
layer around generation. For the disclaimer and emergency handling, answer through medassist:

    python -m medassist serve --base-model <this directory>
    python scripts/predict.py --base-model <this directory> "What is asthma?"

It gives educational information only. It is not a medical device, does not diagnose, and must not be used
for decisions about anyone's care.

## Raw use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained("<this directory>")
model = AutoModelForCausalLM.from_pretrained("<this directory>")
prompt = "{example}"
ids = tokenizer(prompt, return_tensors="pt")  # adds <bos>
print(tokenizer.decode(model.generate(**ids, max_new_tokens=200)[0, ids.input_ids.shape[1]:], skip_special_tokens=True))
```
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m medassist merge", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", required=True, help="a lora_adapter/ directory written by fit")
    p.add_argument("--out", required=True, help="the directory to write (must not exist or be empty, see --force)")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="dtype of the saved weights")
    p.add_argument("--base-model", help="base model source (default: the one the adapter was trained on)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument("--allow-template-mismatch", action="store_true")
    args = p.parse_args(argv)
    try:
        out = merge(args.adapter, args.out, args.dtype, args.base_model, args.force, args.allow_template_mismatch)
    except UserError as e:
        print(e.line("merge"), file=sys.stderr)
        return 2
    print(f"wrote {out} (load it with transformers.AutoModelForCausalLM.from_pretrained, or serve it with "
          f"`python -m medassist serve --base-model {out}`)", file=sys.stderr)
    return 0
