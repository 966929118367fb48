"""Does an exported GGUF answer in llama.cpp as the adapter answers in medassist? Same prompt ids, same greedy ids.

    npm i -E node-llama-cpp@3.21.1 --prefix /tmp/llama          # llama.cpp, prebuilt, from the npm registry
    python scripts/check_gguf.py --adapter checkpoints/lora/version_0/lora_adapter --gguf exports/medassist.gguf \
        --llama-dir /tmp/llama

Our side: the adapter merged into its base (generate.load_for_generation, fp32), the prompt from prompts.py, greedy
without a repetition penalty (llama.cpp's default here). Their side: scripts/gguf_llamacpp.mjs, the prompt text
tokenized by llama.cpp's own tokenizer from the GGUF. Prints one JSON line; exit 1 if the prompt ids differ (a
template or tokenizer mismatch: the gibberish users of other exporters report).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from medassist.generate import load_for_generation
from medassist.prompts import encode_conversation, format_conversation, stop_ids

SCRIPT = Path(__file__).with_name("gguf_llamacpp.mjs")


def ours(adapter: str, messages: list[dict], n: int) -> dict:
    model, tokenizer, _ = load_for_generation(adapter, precision="fp32", decode_weights="dense")  # the exact merge
    ids = encode_conversation(tokenizer, messages)
    out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=n, do_sample=False, repetition_penalty=1.0,
                         eos_token_id=stop_ids(tokenizer))[0, len(ids):].tolist()  # llama.cpp stops at its EOG ids
    return {"prompt": ids, "generated": out, "text": tokenizer.decode(out, skip_special_tokens=True)}


def theirs(gguf: str, messages: list[dict], n: int, llama_dir: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        prompt = Path(tmp) / "prompt.txt"
        prompt.write_text(format_conversation(messages), encoding="utf-8")
        done = subprocess.run(["node", str(SCRIPT.resolve()), str(Path(gguf).resolve()), str(prompt), str(n)],
                              cwd=llama_dir, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"check_gguf.py: llama.cpp failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", required=True)
    p.add_argument("--gguf", required=True)
    p.add_argument("--llama-dir", required=True, help="where `npm i node-llama-cpp` was run")
    p.add_argument("--question", default="What is asthma?")
    p.add_argument("--tokens", type=int, default=40)
    args = p.parse_args(argv)
    messages = [{"role": "user", "content": args.question}]
    a, b = ours(args.adapter, messages, args.tokens), theirs(args.gguf, messages, args.tokens, args.llama_dir)
    same = len(os.path.commonprefix([a["generated"], b["generated"]]))  # element-wise: lists work too
    print(json.dumps({"prompt_ids_equal": a["prompt"] == b["prompt"], "prompt_tokens": len(a["prompt"]),
                      "generated_ids_equal_for": same, "medassist_tokens": len(a["generated"]),
                      "llamacpp_tokens": len(b["generated"]), "medassist": a["text"], "llama.cpp": b["text"]}))
    return 0 if a["prompt"] == b["prompt"] else 1


if __name__ == "__main__":
    sys.exit(main())
