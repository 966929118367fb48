"""Training and generation speed of medassist against the plain transformers.Trainer + peft recipe, on one machine.

    python scripts/benchmark.py [--model embedded|gemma-2b-random|DIR] [--precision auto|bf16|fp32]
        [--quantization int8|nf4|none|both] [--batch-size 4] [--seq-len 256] [--steps 6] [--warmup 2] [--threads N]

Each side runs in its own subprocess (peak memory is per process), one after the other; both train on the same
batches in the same order from the same seed. The last line printed is one JSON object. Numbers: BENCHMARKS.md.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from medassist.data import IGNORE_INDEX

ROOT = Path(__file__).resolve().parents[1]

QUESTION = "What are the common symptoms of type 2 diabetes, and when should someone see a doctor?"
GEMMA_2B = dict(hidden_size=2048, num_hidden_layers=18, num_attention_heads=8, num_key_value_heads=1, head_dim=256,
                intermediate_size=16384, vocab_size=256000, max_position_embeddings=8192)  # google/gemma-2b's config


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_memory_mb() -> float:
    """GPU: peak allocated by torch; CPU: peak resident set of this process (ru_maxrss is in KiB on Linux)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_peak(dtype: torch.dtype, seconds: float = 1.0) -> float:
    """GFLOP/s of square matmuls in `dtype`: a warm-up, then a timed loop with the device synchronised around it."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n = 8192 if device == "cuda" else 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync()
    start, iters = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        a @ b
        iters += 1
        sync()
    return 2 * n**3 * iters / (time.perf_counter() - start) / 1e9


def flops_per_token(model) -> tuple[int, int]:
    """(FLOPs per token of forward + backward through the frozen linears and the LoRA, FLOPs per lm_head token).

    Frozen weights: forward 2 x params, backward only the input gradient, 2 x params. LoRA: 6 x params (its weight
    gradients too). The output head: logits plus their input gradient, 4 x V x d. Attention scores are left out
    (a few percent at these lengths).
    """
    frozen = sum(m.in_features * m.out_features for name, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and "lora_" not in name and not name.endswith("lm_head"))
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    vocab, hidden = model.get_output_embeddings().weight.shape
    return 4 * frozen + 6 * lora, 4 * vocab * hidden


def make_gemma_2b_random() -> str:
    """A directory with google/gemma-2b's shape, random weights (bf16) and the embedded tokenizer; built once."""
    from transformers import GemmaConfig, GemmaForCausalLM

    from medassist.loading import cache_root, load_tokenizer

    out = cache_root() / "gemma-2b-random"
    if not (out / "config.json").exists():
        tokenizer = load_tokenizer("embedded")  # the bundled data tokenizes below id 256000 (max 236908)
        config = GemmaConfig(**GEMMA_2B, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        torch.manual_seed(0)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".gemma-2b-random-", dir=out.parent))  # renamed when complete
        GemmaForCausalLM._from_config(config, dtype=torch.bfloat16).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(out)
    return str(out)


def config() -> dict:
    return yaml.safe_load((ROOT / "configs" / "lora.yaml").read_text())


def datamodule(args):
    from medassist.data import InstructionDataModule

    data = config()["data"] | dict(base_model=args.model, max_seq_length=args.seq_len, batch_size=args.batch_size)
    dm = InstructionDataModule(**data)
    dm.setup("fit")
    return dm


# ---- the two training sides, each in its own process ----------------------------------------------------------
class Steps:
    """Per optimizer step: seconds and loss; the LoRA weights' checksum before the first step."""

    def __init__(self):
        self.seconds, self.cpu_seconds, self.losses, self.tokens, self.lora_checksum = [], [], [], [], None

    def begin(self, model):
        if self.lora_checksum is None:
            self.lora_checksum = sum(p.double().abs().sum().item() for p in model.parameters() if p.requires_grad)
        sync()
        self.start = time.perf_counter(), time.process_time()

    def end(self):
        sync()
        self.seconds.append(time.perf_counter() - self.start[0])
        self.cpu_seconds.append(time.process_time() - self.start[1])  # less sensitive to other processes

    def summary(self, args, model, lm_head_on_response: bool) -> dict:
        """Throughput over the timed steps; `tokens` holds (real tokens, supervised tokens, padded width) per step."""
        per_token, per_head = flops_per_token(model)
        timed = slice(args.warmup, None)
        seconds, cpu_seconds = sum(self.seconds[timed]), sum(self.cpu_seconds[timed])
        tokens, response, width = (sum(x) for x in zip(*self.tokens[timed]))
        flops = sum(args.batch_size * w * per_token + (r if lm_head_on_response else args.batch_size * w) * per_head
                    for _, r, w in self.tokens[timed])
        return dict(tokens_per_s=tokens / seconds, response_tokens_per_s=response / seconds,
                    tokens_per_cpu_s=tokens / cpu_seconds, cpu_s=self.cpu_seconds,
                    padded_tokens_per_s=args.batch_size * width / seconds, step_s=self.seconds, losses=self.losses,
                    loss=self.losses[-1], tokens=self.tokens, tflops=flops / seconds / 1e12,
                    dtype=str(model.get_output_embeddings().weight.dtype).removeprefix("torch."),
                    lora_checksum=self.lora_checksum, peak_memory_mb=peak_memory_mb(), loadavg=os.getloadavg())


def side_ours(args) -> dict:
    import lightning as L

    from medassist.model import MedAssistLM

    class Meter(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            steps.begin(pl_module)
            steps.tokens.append((int(batch["attention_mask"].sum()),
                                 int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()), batch["input_ids"].shape[1]))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            steps.end()
            steps.losses.append(float(trainer.callback_metrics["train/loss"]))

    cfg, steps = config(), Steps()
    # Constant learning rate, as in the baseline: no warm-up, cosine floor = 1.
    hp = cfg["model"] | dict(base_model=args.model, quantization=args.quant, precision=args.precision,
                             warmup_steps=0, min_lr_ratio=1.0)
    dm, lm = datamodule(args), MedAssistLM(**hp)
    L.seed_everything(cfg["seed_everything"])
    trainer = L.Trainer(accelerator="auto", devices=1, precision="32-true", max_steps=args.warmup + args.steps,
                        gradient_clip_val=cfg["trainer"]["gradient_clip_val"], logger=False, callbacks=[Meter()],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=args.workdir)
    trainer.fit(lm, datamodule=dm)  # AdapterCheckpoint writes workdir/lora_adapter: the generation sides use it
    return steps.summary(args, lm.model, lm_head_on_response=True)


def side_baseline(args) -> dict:
    """The recipe medassist replaces: HF Trainer, batches padded to seq_len, logits for every position."""
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from medassist.loading import load_model, lora_config

    class Meter(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            steps.begin(model)

        def on_step_end(self, args, state, control, **kwargs):
            steps.end()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                steps.losses.append(float(logs["loss"]))

    cfg, steps, bs = config(), Steps(), args.batch_size
    hp, dm = cfg["model"], datamodule(args)
    order = list(dm.train_dataloader().sampler)[: bs * (args.warmup + args.steps)]  # ours' examples, ours' order
    rows = [{k: dm.train_set[i][k] for k in ("input_ids", "labels")} for i in order]
    steps.tokens = [(sum(len(r["input_ids"]) for r in rows[k:k + bs]),
                     sum(t != IGNORE_INDEX for r in rows[k:k + bs] for t in r["labels"][1:]), args.seq_len)
                    for k in range(0, len(rows), bs)]
    torch.manual_seed(cfg["seed_everything"])  # same LoRA initialisation as ours (checked by lora_checksum)
    base = load_model(args.model, args.quant, args.precision, hp["attn_implementation"],
                      "cuda" if torch.cuda.is_available() else "cpu")
    model = get_peft_model(base, lora_config(hp["lora_r"], hp["lora_alpha"], hp["lora_dropout"], hp["target_modules"]))
    dm.tokenizer.padding_side = "right"  # Gemma gave NaN logits in training with left padding (transformers #30004)
    targs = TrainingArguments(
        output_dir=str(Path(args.workdir) / "hf"), per_device_train_batch_size=bs, max_steps=args.warmup + args.steps,
        learning_rate=hp["learning_rate"], weight_decay=hp["weight_decay"], lr_scheduler_type="constant",
        optim="adamw_torch", max_grad_norm=cfg["trainer"]["gradient_clip_val"], train_sampling_strategy="sequential",
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(), seed=cfg["seed_everything"])
    collator = DataCollatorForSeq2Seq(dm.tokenizer, padding="max_length", max_length=args.seq_len)
    Trainer(model=model, args=targs, train_dataset=Dataset.from_list(rows), data_collator=collator,
            callbacks=[Meter()]).train()
    return steps.summary(args, model, lm_head_on_response=False)


# ---- the two generation sides ---------------------------------------------------------------------------------
def time_generation(model, tokenizer, new_tokens: int) -> dict:
    """Time to first token and tokens/s of greedy decoding with a KV cache; exactly `new_tokens` tokens each time."""
    from medassist.generate import context_length, prompt_ids

    ids = torch.tensor([prompt_ids(tokenizer, QUESTION, context_length(model), new_tokens)], device=model.device)

    def run(n):
        sync()
        start, cpu = time.perf_counter(), time.process_time()
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, use_cache=True, pad_token_id=tokenizer.pad_token_id)
        sync()
        return time.perf_counter() - start, time.process_time() - cpu

    run(4)  # warm-up
    ttft = min(run(1) for _ in range(3))
    seconds, cpu_seconds = min(run(new_tokens) for _ in range(2))
    return dict(tokens_per_s=new_tokens / seconds, tokens_per_cpu_s=new_tokens / cpu_seconds, ttft_s=ttft[0],
                prompt_tokens=ids.shape[1], new_tokens=new_tokens, peak_memory_mb=peak_memory_mb())


def side_generate_ours(args) -> dict:
    from medassist.generate import load_for_generation

    model, tokenizer, _ = load_for_generation(str(Path(args.workdir) / "lora_adapter"), args.model, args.precision)
    return time_generation(model, tokenizer, args.new_tokens) | dict(how="medassist.generate.load_for_generation: "
                                                                         "base unquantized, LoRA merged")


def side_generate_baseline(args) -> dict:
    from peft import PeftModel

    from medassist.loading import load_model, load_tokenizer

    base = load_model(args.model, args.quant, args.precision, device="cuda" if torch.cuda.is_available() else "cpu")
    model = PeftModel.from_pretrained(base, str(Path(args.workdir) / "lora_adapter")).eval()
    return time_generation(model, load_tokenizer(args.model), args.new_tokens) | dict(
        how=f"PeftModel.generate, {args.quant} base, adapter unmerged")


SIDES = {"ours": side_ours, "baseline": side_baseline, "gen-ours": side_generate_ours,
         "gen-baseline": side_generate_baseline}


def run_side(args, side: str, quant: str) -> dict:
    cmd = [sys.executable, __file__, "--side", side, "--quant", quant, "--workdir", args.workdir, "--model", args.model,
           "--precision", args.precision, "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--new-tokens", str(args.new_tokens),
           "--threads", str(args.threads)]
    print(f"--- {side} ({quant})", file=sys.stderr, flush=True)
    out = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded", help="'embedded' (gemma-3-270m), 'gemma-2b-random', a directory")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--quantization", default="int8", choices=["int8", "nf4", "none", "both"],
                   help="'both' = int8 and none, one after the other")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps before them")
    p.add_argument("--new-tokens", type=int, default=64, help="generated tokens per timed generation")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="CPU threads (1 on a shared machine: other processes stall multi-threaded OpenMP regions)")
    p.add_argument("--side", choices=list(SIDES), help=argparse.SUPPRESS)
    p.add_argument("--quant", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.side:  # a child: one side, one JSON line
        os.chdir(ROOT)
        print(json.dumps(SIDES[args.side](args)))
        return

    from medassist.loading import compute_dtype, cpu_has_native_bf16

    if args.model == "gemma-2b-random":
        args.model = make_gemma_2b_random()
    args.workdir = tempfile.mkdtemp(prefix="medassist-bench-")  # the trained adapter, for the generation sides
    quants = ["int8", "none"] if args.quantization == "both" else [args.quantization]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else _cpu_name()
    peak = {"bf16": matmul_peak(torch.bfloat16), "fp32": matmul_peak(torch.float32)}
    result = dict(device=device, native_bf16=torch.cuda.is_available() or cpu_has_native_bf16(),
                  threads=torch.get_num_threads(), matmul_peak_gflops=peak, model=args.model,
                  compute_dtype=str(compute_dtype(args.precision, "cuda" if torch.cuda.is_available() else "cpu")),
                  batch_size=args.batch_size, seq_len=args.seq_len, steps=args.steps, warmup=args.warmup, runs={})
    for quant in quants:
        base, ours = run_side(args, "baseline", quant), run_side(args, "ours", quant)
        for side in (base, ours):
            side["mfu"] = side["tflops"] * 1e3 / peak["bf16" if side["dtype"] == "bfloat16" else "fp32"]
        result["runs"][quant] = dict(
            baseline=base, ours=ours, train_speedup=ours["tokens_per_s"] / base["tokens_per_s"],
            train_speedup_cpu_time=ours["tokens_per_cpu_s"] / base["tokens_per_cpu_s"],
            peak_memory_ratio=ours["peak_memory_mb"] / base["peak_memory_mb"],
            loss_rel_diff=abs(ours["loss"] - base["loss"]) / base["loss"],
            same_batches=[t[:2] for t in ours["tokens"]] == [t[:2] for t in base["tokens"]],
            same_lora_init=abs(ours["lora_checksum"] - base["lora_checksum"]) < 1e-6 * base["lora_checksum"])
    gen = dict(baseline=run_side(args, "gen-baseline", quants[0]), ours=run_side(args, "gen-ours", quants[0]))
    shutil.rmtree(args.workdir, ignore_errors=True)
    gen["generate_speedup"] = gen["ours"]["tokens_per_s"] / gen["baseline"]["tokens_per_s"]
    gen["generate_speedup_cpu_time"] = gen["ours"]["tokens_per_cpu_s"] / gen["baseline"]["tokens_per_cpu_s"]
    gen["ttft_speedup"] = gen["baseline"]["ttft_s"] / gen["ours"]["ttft_s"]
    result["generation"] = gen
    first = result["runs"][quants[0]]
    result.update({k: first[k] for k in ("train_speedup", "peak_memory_ratio", "loss_rel_diff")},
                  generate_speedup=gen["generate_speedup"])
    print_table(result)
    print(json.dumps(result))


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "cpu"


def print_table(r: dict) -> None:
    print(f"\n{r['device']}, {r['threads']} thread(s); matmul peak bf16 {r['matmul_peak_gflops']['bf16']:.0f}, "
          f"fp32 {r['matmul_peak_gflops']['fp32']:.0f} GFLOP/s; batch {r['batch_size']} x {r['seq_len']}, "
          f"{r['steps']} timed steps after {r['warmup']}")
    print(f"{'run':16} {'tok/s':>8} {'resp tok/s':>10} {'peak MB':>8} {'loss':>8} {'MFU':>6}")
    for quant, run in r["runs"].items():
        for side in ("baseline", "ours"):
            s = run[side]
            print(f"{quant + ' ' + side:16} {s['tokens_per_s']:8.1f} {s['response_tokens_per_s']:10.1f} "
                  f"{s['peak_memory_mb']:8.0f} {s['loss']:8.4f} {s['mfu']:6.1%}")
        print(f"{quant}: speedup {run['train_speedup']:.2f}x ({run['train_speedup_cpu_time']:.2f}x in CPU time), memory {run['peak_memory_ratio']:.2f}x, loss diff "
              f"{run['loss_rel_diff']:.2%}, same batches {run['same_batches']}, same LoRA init {run['same_lora_init']}")
    g = r["generation"]
    for side in ("baseline", "ours"):
        print(f"generate {side:9} {g[side]['tokens_per_s']:6.1f} tok/s, TTFT {g[side]['ttft_s']:.3f} s, "
              f"peak {g[side]['peak_memory_mb']:.0f} MB ({g[side]['how']})")
    print(f"generate speedup {g['generate_speedup']:.2f}x ({g['generate_speedup_cpu_time']:.2f}x in CPU time), "
          f"TTFT {g['ttft_speedup']:.2f}x")


if __name__ == "__main__":
    main()
