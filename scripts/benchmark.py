"""Training and generation speed of medassist against the strongest peers a user would pick, on one machine.

    python scripts/benchmark.py [--model embedded|gemma-2b-random|DIR] [--precision auto|bf16|fp32]
        [--quantization int8|nf4|none|both] [--batch-size 4] [--seq-len 256] [--steps 6] [--warmup 2]
        [--rounds 3] [--threads N] [--peers medassist,tuned,trl,seed] [--generate-peers medassist,dense,merged,seed]

Peers (scripts/bench_peers.py): training: medassist, `tuned` (transformers.Trainer + peft, dynamic padding), `trl`
(trl.SFTTrainer, completion_only_loss; `pip install trl`, skipped with the reason when it does not run), `seed`
(padded to --seq-len, for reference); generation: medassist (int8 decode weights on CPU), `dense` (medassist with
dense decode weights), `merged` (peft merge_and_unload + plain generate), `seed` (unmerged PeftModel on the quantized
base); answers are compared by their leading greedy tokens in common and by answer NLL on validation answers.
Each run is its own subprocess (peak memory is per process); the peers run interleaved, A B C A B C ..., for
--rounds rounds, so that load changes on the machine fall on every peer alike, and the medians are reported
(speedups: the median of the per-round ratios). The last line printed is one JSON object. Numbers: BENCHMARKS.md.
"""

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import bench_peers
from bench_peers import GENERATE, TRAIN

ROOT = Path(__file__).resolve().parents[1]
GEMMA_2B = dict(hidden_size=2048, num_hidden_layers=18, num_attention_heads=8, num_key_value_heads=1, head_dim=256,
                intermediate_size=16384, vocab_size=256000, max_position_embeddings=8192)  # google/gemma-2b's config
MEDIANS = ("tokens_per_s", "response_tokens_per_s", "tokens_per_cpu_s", "padded_tokens_per_s", "peak_memory_mb",
           "tflops", "mfu", "ttft_s")


# ---- the machine ----------------------------------------------------------------------------------------------
def parse_cpuinfo(text: str) -> dict:
    """The CPU's model name and its bf16 flags, from /proc/cpuinfo (or `lscpu`) text."""
    model, flags = "cpu", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model name") and model == "cpu":
            model = value.strip()
        elif key.strip() in ("flags", "Flags"):
            flags |= set(value.split())
    amx, avx = "amx_bf16" in flags, "avx512_bf16" in flags
    return dict(model=model, bf16_native=amx or avx, amx_bf16=amx, avx512_bf16=avx)


def cpu_info() -> dict:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: lscpu, where there is one
        text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout if shutil.which("lscpu") else ""
    return parse_cpuinfo(text)


def native_dtypes(cpu: dict, gpu_bf16: bool | None) -> list[str]:
    """The dtypes the hardware multiplies natively: fp32 always; bf16 on a bf16 GPU (gpu_bf16; None: no GPU) or on
    an AMX/AVX512-BF16 CPU. Elsewhere torch emulates bf16 ~100x slower: its 'peak' would take minutes, mean nothing."""
    return ["fp32", "bf16"] if (cpu["bf16_native"] if gpu_bf16 is None else gpu_bf16) else ["fp32"]


def matmul_peak(dtype: torch.dtype, seconds: float = 1.0, largest: int | None = None) -> float:
    """GFLOP/s of square matmuls in `dtype`, in about `seconds`: the size doubles from 256 while one warm matmul of
    the next size (8x the work) would take under an eighth of the budget, so a slow dtype stops small; then a timed
    loop with the device synchronised around it."""
    dev = bench_peers.device()
    largest = largest or (8192 if dev == "cuda" else 2048)
    n, deadline = 256, time.perf_counter() + seconds
    while True:
        a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
        a @ b  # the first product of a size pays oneDNN's kernel choice: not timed
        bench_peers.sync()
        start = time.perf_counter()
        a @ b
        bench_peers.sync()
        if n >= largest or 8 * (time.perf_counter() - start) > seconds / 8 or time.perf_counter() > deadline:
            break
        n *= 2
    start, iters = time.perf_counter(), 0
    while iters < 1 or time.perf_counter() - start < seconds / 2:
        a @ b
        iters += 1
        bench_peers.sync()
    return 2 * n**3 * iters / (time.perf_counter() - start) / 1e9


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


# ---- running the peers ----------------------------------------------------------------------------------------
def interleave(peers: list[str], rounds: int) -> list[str]:
    """A B C A B C ...: neighbours in time share the machine's load, and no peer always goes first."""
    return [peer for _ in range(rounds) for peer in peers]


FORWARDED = ("model", "precision", "batch_size", "seq_len", "steps", "warmup", "new_tokens", "threads",
             "tuned_sampler", "workdir")


def run_side(args, kind: str, peer: str, quant: str) -> dict:
    """One peer in a fresh process (in this one with --in-process: the tests' smoke run); its last line is JSON."""
    print(f"--- {kind} {peer} ({quant})", file=sys.stderr, flush=True)
    if args.in_process:
        return json.loads(json.dumps((TRAIN if kind == "train" else GENERATE)[peer](
            argparse.Namespace(**(vars(args) | dict(quant=quant))))))
    cmd = [sys.executable, __file__, "--side", f"{kind}:{peer}", "--quant", quant]
    cmd += [a for k in FORWARDED for a in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{kind} {peer} ({quant}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def trl_missing() -> str | None:
    return None if importlib.util.find_spec("trl") else "trl is not installed (pip install trl)"


def run_peers(args, kind: str, peers: list[str], quant: str) -> tuple[dict, dict]:
    """({peer: [one dict per round]}, {peer: why it was skipped}); a failing trl is skipped, any other fails."""
    runs, skipped = {p: [] for p in peers}, {}
    if "trl" in peers and (reason := trl_missing()):
        skipped["trl"] = reason
    for peer in interleave([p for p in peers if p not in skipped], args.rounds):
        if peer in skipped:
            continue
        try:
            runs[peer].append(run_side(args, kind, peer, quant))
        except Exception as e:  # noqa: BLE001 - an optional peer's failure is reported, not fatal
            if peer != "trl":
                raise
            skipped[peer] = str(e).strip().splitlines()[-1]
            print(f"trl skipped: {skipped[peer]}", file=sys.stderr)
    return {p: r for p, r in runs.items() if p not in skipped and r}, skipped


# ---- the numbers ----------------------------------------------------------------------------------------------
def medians(rounds: list[dict]) -> dict:
    """The first round's record (losses, tokens, steps: the same every round) with MEDIANS over the rounds."""
    out = dict(rounds[0])
    for key in MEDIANS:
        values = [r[key] for r in rounds if r.get(key) is not None]
        if values:
            out[key] = statistics.median(values)
    out["rounds"] = [{k: r.get(k) for k in MEDIANS + ("loss", "loadavg") if k in r} for r in rounds]
    return out


def paired_ratio(a: list[dict], b: list[dict], key: str, inverse: bool = False) -> float:
    """Median over rounds of a/b (b/a if inverse): each round's two runs ran next to each other."""
    ratios = [(y[key] / x[key]) if inverse else (x[key] / y[key]) for x, y in zip(a, b)]
    return statistics.median(ratios)


def compare_batches(ours: list, peer: list, batch_size: int) -> dict:
    """Per step (real tokens, supervised tokens, padded width): same examples AND same padded widths."""
    same_tokens = [tuple(t[:2]) for t in ours] == [tuple(t[:2]) for t in peer]
    same_widths = [t[2] for t in ours] == [t[2] for t in peer]
    return dict(same_batches=same_tokens and same_widths, same_tokens=same_tokens, same_widths=same_widths,
                padded_positions=[batch_size * sum(t[2] for t in side) for side in (ours, peer)])


def add_mfu(run: dict, peak: dict) -> None:
    """MFU against the measured peak of the side's compute dtype; None where that dtype was not measured."""
    dtype = "bf16" if run["dtype"] == "bfloat16" else "fp32"
    run["mfu"] = run["tflops"] * 1e3 / peak[dtype] if dtype in peak else None


def train_report(args, runs: dict, skipped: dict, peak: dict) -> dict:
    for rounds in runs.values():
        for run in rounds:
            add_mfu(run, peak)
    ours = runs["medassist"]
    report = dict(skipped=skipped, peers={p: medians(r) for p, r in runs.items()}, vs={})
    for peer, rounds in runs.items():
        if peer == "medassist":
            continue
        first = rounds[0]
        report["vs"][peer] = dict(
            train_speedup=paired_ratio(ours, rounds, "tokens_per_s"),
            train_speedup_cpu_time=paired_ratio(ours, rounds, "tokens_per_cpu_s"),
            peak_memory_ratio=paired_ratio(ours, rounds, "peak_memory_mb"),
            loss_rel_diff=abs(ours[0]["loss"] - first["loss"]) / first["loss"],
            same_lora_init=abs(ours[0]["lora_checksum"] - first["lora_checksum"]) < 1e-6 * first["lora_checksum"],
            **compare_batches(ours[0]["tokens"], first["tokens"], args.batch_size))
    return report


def generate_report(runs: dict) -> dict:
    report = dict(peers={p: medians(r) for p, r in runs.items()}, vs={})
    for peer, rounds in runs.items():
        if peer != "medassist":
            report["vs"][peer] = dict(generate_speedup=paired_ratio(runs["medassist"], rounds, "tokens_per_s"),
                                      generate_speedup_cpu_time=paired_ratio(runs["medassist"], rounds,
                                                                             "tokens_per_cpu_s"),
                                      ttft_speedup=paired_ratio(runs["medassist"], rounds, "ttft_s", inverse=True),
                                      **same_answers(runs["medassist"][0], rounds[0]))
    return report


def same_answers(ours: dict, peer: dict) -> dict:
    """How far the greedy answers agree (leading tokens in common) and the relative answer-NLL difference."""
    common = len(os.path.commonprefix([ours["generated"], peer["generated"]]))  # element-wise: lists work too
    nll = {"answer_nll_rel_diff": (ours["answer_nll"] - peer["answer_nll"]) / peer["answer_nll"]} \
        if peer.get("answer_nll") else {}
    return dict(same_leading_tokens=common, **nll)


def headline(result: dict, quant: str) -> dict:
    """The keys the README and CI read: against tuned / merged, with the seed recipe and TRL beside them."""
    train, gen = result["runs"][quant]["vs"], result["generation"]["vs"]
    tuned = train.get("tuned", {})
    return dict(train_speedup=tuned.get("train_speedup"), peak_memory_ratio=tuned.get("peak_memory_ratio"),
                loss_rel_diff=tuned.get("loss_rel_diff"), same_batches=tuned.get("same_batches"),
                generate_speedup=gen.get("merged", {}).get("generate_speedup"),
                answer_nll_rel_diff=gen.get("merged", {}).get("answer_nll_rel_diff"),
                train_speedup_vs_seed=train.get("seed", {}).get("train_speedup"),
                generate_speedup_vs_seed=gen.get("seed", {}).get("generate_speedup"),
                **({"train_speedup_vs_trl": train["trl"]["train_speedup"]} if "trl" in train else {}),
                mfu={p: r.get("mfu") for p, r in result["runs"][quant]["peers"].items()})


# ---- the command ----------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded", help="'embedded' (gemma-3-270m), 'gemma-2b-random', a directory")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--quantization", default="int8", choices=["int8", "nf4", "none", "both"],
                   help="'both' = int8 and none, one after the other")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps before them")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every peer; medians reported")
    p.add_argument("--new-tokens", type=int, default=64, help="generated tokens per timed generation")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="CPU threads (1 on a shared machine: other processes stall multi-threaded OpenMP regions)")
    p.add_argument("--peers", default="medassist,tuned,trl,seed", help="training peers (medassist always runs)")
    p.add_argument("--generate-peers", default="medassist,dense,merged,seed", help="generation peers; '' = none")
    p.add_argument("--tuned-sampler", default="sequential", choices=["sequential", "group_by_length"],
                   help="sequential: tuned/trl train on ours' length-grouped batches (same batches, checked); "
                        "group_by_length: transformers' own LengthGroupedSampler over the same examples")
    p.add_argument("--peak-seconds", type=float, default=1.0, help="time for each dtype's matmul peak")
    p.add_argument("--in-process", action="store_true", help="run the peers in this process (smoke tests only: "
                   "peak memory is then the largest so far)")
    p.add_argument("--side", help=argparse.SUPPRESS)
    p.add_argument("--quant", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def peer_list(text: str, known: dict) -> list[str]:
    peers = ["medassist"] + [p for p in (x.strip() for x in text.split(",")) if p and p != "medassist"]
    unknown = [p for p in peers if p not in known]
    if unknown:
        raise SystemExit(f"benchmark.py: unknown peer(s) {unknown}; choose from {sorted(known)}")
    return peers


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.side:  # a child: one peer, one JSON line
        os.chdir(ROOT)
        kind, peer = args.side.split(":")
        print(json.dumps((TRAIN if kind == "train" else GENERATE)[peer](args)))
        return {}
    from medassist.loading import compute_dtype

    if args.model == "gemma-2b-random":
        args.model = make_gemma_2b_random()
    train_peers, gen_peers = peer_list(args.peers, TRAIN), peer_list(args.generate_peers, GENERATE)
    gen_peers = gen_peers if args.generate_peers.strip() else []
    cpu = cpu_info()
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    gpu_bf16 = torch.cuda.is_bf16_supported() if torch.cuda.is_available() else None
    peak = {name: matmul_peak(dtypes[name], args.peak_seconds) for name in native_dtypes(cpu, gpu_bf16)}
    args.workdir = tempfile.mkdtemp(prefix="medassist-bench-")  # the trained adapter, for the generation peers
    quants = ["int8", "none"] if args.quantization == "both" else [args.quantization]
    result = dict(device=torch.cuda.get_device_name() if torch.cuda.is_available() else cpu["model"], cpu=cpu,
                  threads=torch.get_num_threads(), matmul_peak_gflops=peak, model=args.model,
                  compute_dtype=str(compute_dtype(args.precision, bench_peers.device())), batch_size=args.batch_size,
                  seq_len=args.seq_len, steps=args.steps, warmup=args.warmup, rounds=args.rounds,
                  tuned_sampler=args.tuned_sampler, runs={})
    try:
        for quant in quants:
            result["runs"][quant] = train_report(args, *run_peers(args, "train", train_peers, quant), peak)
        result["generation"] = generate_report(run_peers(args, "generate", gen_peers, quants[0])[0])
    finally:
        shutil.rmtree(args.workdir, ignore_errors=True)
    result.update(headline(result, quants[0]))
    print_table(result)
    print(json.dumps(result))
    return result


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(r: dict) -> None:
    peak = ", ".join(f"{k} {v:.0f}" for k, v in r["matmul_peak_gflops"].items())
    print(f"\n{r['device']}, {r['threads']} thread(s); matmul peak {peak} GFLOP/s; batch {r['batch_size']} x "
          f"{r['seq_len']}, {r['steps']} timed steps after {r['warmup']}, medians of {r['rounds']} rounds")
    print(f"{'run':18} {'tok/s':>8} {'resp tok/s':>10} {'peak MB':>8} {'loss':>8} {'MFU':>6} {'padded':>7} "
          f"{'ours is':>8} {'same batches':>12}")
    for quant, run in r["runs"].items():
        for peer, s in run["peers"].items():
            vs = run["vs"].get(peer, {})
            speedup = f"{vs['train_speedup']:.2f}x" if vs else ""
            print(f"{quant + ' ' + peer:18} {s['tokens_per_s']:8.1f} {s['response_tokens_per_s']:10.1f} "
                  f"{s['peak_memory_mb']:8.0f} {s['loss']:8.4f} {_fmt(s['mfu'], '6.1%')} "
                  f"{r['batch_size'] * sum(t[2] for t in s['tokens']):7d} {speedup:>8} "
                  f"{str(vs.get('same_batches', '')):>12}")
        for peer, why in run["skipped"].items():
            print(f"{quant + ' ' + peer:18} skipped: {why}")
    for peer, g in r["generation"]["peers"].items():
        vs = r["generation"]["vs"].get(peer)
        print(f"generate {peer:9} {g['tokens_per_s']:6.1f} tok/s, TTFT {g['ttft_s']:.3f} s, peak "
              f"{g['peak_memory_mb']:.0f} MB, answer NLL {_fmt(g.get('answer_nll'), '.4f')}"
              + (f", ours is {vs['generate_speedup']:.2f}x, {vs['same_leading_tokens']} leading tokens in common"
                 if vs else "") + f" ({g['how']})")


if __name__ == "__main__":
    main()
