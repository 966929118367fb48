"""scripts/benchmark.py and scripts/bench_peers.py: the pure parts, the tuned collator, and one tiny run of every
peer in this process (the real script runs each in its own)."""

import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))  # the script imports its sibling bench_peers as a top-level module

import bench_peers  # noqa: E402
import benchmark  # noqa: E402


def test_tuned_collator_pads_to_the_longest_example_rounded_up_to_8(tiny_tokenizer):
    rows = [dict(input_ids=[5] * n, labels=[-100] * (n - 2) + [5, 5]) for n in (3, 13, 9)]
    batch = bench_peers.tuned_collator(tiny_tokenizer)(rows)
    assert batch["input_ids"].shape == (3, 16)  # longest 13 -> 16, not --seq-len
    assert batch["attention_mask"].sum(1).tolist() == [3, 13, 9]
    assert (batch["labels"][0, 3:] == -100).all() and batch["labels"][1, 11:13].tolist() == [5, 5]
    assert bench_peers.batch_tokens(batch) == (25, 6, 16)  # real, supervised after the shift, padded width
    seed = bench_peers.tuned_collator(tiny_tokenizer, max_length=64)(rows)
    assert seed["input_ids"].shape == (3, 64)


def test_tuned_collator_matches_ours(tiny_tokenizer):
    """The tuned peer pads exactly as medassist.data.collate does, so the two train on identical tensors."""
    from medassist.data import collate

    rows = [dict(input_ids=list(range(7, 7 + n)), labels=[-100] * 4 + list(range(11, 7 + n))) for n in (6, 17)]
    theirs, ours = bench_peers.tuned_collator(tiny_tokenizer)(rows), collate(rows, tiny_tokenizer.pad_token_id)
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(theirs[key], ours[key]), key


def test_same_batches_needs_same_tokens_and_same_widths():
    ours = [(100, 80, 32), (60, 50, 24)]
    assert benchmark.compare_batches(ours, list(ours), batch_size=4) == dict(
        same_batches=True, same_tokens=True, same_widths=True, padded_positions=[224, 224])
    wider = benchmark.compare_batches(ours, [(100, 80, 256), (60, 50, 256)], batch_size=4)
    assert wider["same_tokens"] and not wider["same_widths"] and not wider["same_batches"]
    assert wider["padded_positions"] == [224, 2048]
    other = benchmark.compare_batches(ours, [(100, 81, 32), (60, 50, 24)], batch_size=4)
    assert not other["same_batches"] and other["same_widths"]


def test_peers_interleave_round_by_round():
    assert benchmark.interleave(["A", "B"], 3) == ["A", "B", "A", "B", "A", "B"]
    assert benchmark.interleave(["medassist", "tuned", "seed"], 2) == ["medassist", "tuned", "seed"] * 2


def test_paired_ratio_is_the_median_of_per_round_ratios():
    ours = [dict(t=10.0), dict(t=30.0), dict(t=20.0)]
    peer = [dict(t=5.0), dict(t=10.0), dict(t=20.0)]  # ratios 2, 3, 1
    assert benchmark.paired_ratio(ours, peer, "t") == 2.0
    assert benchmark.paired_ratio(ours, peer, "t", inverse=True) == 0.5


CPUINFO = "processor\t: 0\nmodel name\t: {name}\nflags\t\t: fpu sse2 avx2 avx512f {flags}\n\nprocessor\t: 1\n"


@pytest.mark.parametrize("flags, native, amx", [("", False, False), ("avx512_bf16", True, False),
                                                ("amx_tile amx_bf16 avx512_bf16", True, True)])
def test_native_dtypes_follow_the_cpu_flags(flags, native, amx):
    cpu = benchmark.parse_cpuinfo(CPUINFO.format(name="Some CPU 9000", flags=flags))
    assert cpu == dict(model="Some CPU 9000", bf16_native=native, amx_bf16=amx, avx512_bf16="avx512_bf16" in flags)
    assert benchmark.native_dtypes(cpu, gpu_bf16=None) == (["fp32", "bf16"] if native else ["fp32"])
    assert benchmark.native_dtypes(cpu, gpu_bf16=True) == ["fp32", "bf16"]  # a GPU decides, not the host CPU
    assert benchmark.native_dtypes(cpu, gpu_bf16=False) == ["fp32"]


def test_parse_lscpu_output():
    cpu = benchmark.parse_cpuinfo("Architecture: x86_64\nModel name: AMD EPYC 9R14\nFlags: avx2 avx512_bf16\n")
    assert cpu["model"] == "AMD EPYC 9R14" and cpu["bf16_native"]


def test_matmul_peak_keeps_to_its_time_budget():
    start = time.perf_counter()
    gflops = benchmark.matmul_peak(torch.float32, seconds=0.3)
    assert gflops > 0 and time.perf_counter() - start < 3  # one slow matmul stops the size growing


def test_smoke_run_reports_every_peer(tiny_model_dir, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # the data module reads data/*.jsonl, as the real children do from the root
    peers = "medassist,tuned,trl,seed" if benchmark.trl_missing() is None else "medassist,tuned,seed"
    threads = torch.get_num_threads()
    try:
        result = benchmark.main(["--model", str(tiny_model_dir), "--quantization", "none", "--precision", "fp32",
                                 "--batch-size", "2", "--seq-len", "512", "--steps", "1", "--warmup", "1",
                                 "--rounds", "1", "--new-tokens", "2", "--threads", "1", "--peak-seconds", "0.1",
                                 "--peers", peers, "--in-process"])
    finally:  # main sets the process's torch threads: the tests after this one must not run on one thread
        torch.set_num_threads(threads)
    for key in ("train_speedup", "peak_memory_ratio", "loss_rel_diff", "generate_speedup", "train_speedup_vs_seed",
                "generate_speedup_vs_seed", "same_batches"):
        assert result[key] is not None, key
    assert ("train_speedup_vs_trl" in result) == ("trl" in peers)
    assert set(result["mfu"]) == set(peers.split(",")) and result["mfu"]["tuned"] > 0
    assert set(result["cpu"]) == {"model", "bf16_native", "amx_bf16", "avx512_bf16"}
    run = result["runs"]["none"]
    assert run["vs"]["tuned"]["same_batches"] and run["vs"]["tuned"]["same_lora_init"]
    # the tiny tokenizer's examples are 204-509 tokens: the seed recipe pads every batch to 512, the others do not
    assert run["vs"]["seed"]["same_tokens"] and not run["vs"]["seed"]["same_widths"]
    assert not run["vs"]["seed"]["same_batches"]
    tuned, seed = run["vs"]["tuned"]["padded_positions"], run["vs"]["seed"]["padded_positions"]
    assert tuned[0] == tuned[1] < seed[1] == 2 * 2 * 512  # two steps of 2 rows padded to --seq-len
    assert all(t[2] % 8 == 0 for t in run["peers"]["tuned"]["tokens"])
    if "trl" in peers:
        assert run["vs"]["trl"]["same_batches"]  # TRL's own collator built exactly our batches
    assert run["vs"]["tuned"]["loss_rel_diff"] < 1e-3  # same batches, same init, same loss (fp32)
    generation = result["generation"]
    assert set(generation["peers"]) == {"medassist", "dense", "merged", "seed"}
    nll = {p: generation["peers"][p]["answer_nll"] for p in ("medassist", "dense", "merged")}
    assert nll["dense"] == pytest.approx(nll["merged"], rel=1e-5)  # the same merged weights, decoded densely
    assert 0 < abs(generation["vs"]["dense"]["answer_nll_rel_diff"]) < 0.01  # int8 decoding: close, not identical
    assert result["answer_nll_rel_diff"] == generation["vs"]["merged"]["answer_nll_rel_diff"]
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("{")
