"""Weight-only int8 decoding (medassist/int8_decode.py): what it computes, where it applies, and that a row's result
does not depend on who shares its step (the batcher with int8 rows: tests/test_batching.py)."""

import pytest
import torch
import torch.nn as nn

from medassist import UserError
from medassist.generate import load_for_generation
from medassist.int8_decode import Int8DecodeLinear, quantize_rows


def test_rows_are_quantized_symmetrically_with_one_scale_each():
    torch.manual_seed(0)
    weight = torch.randn(40_000, 64) * torch.logspace(-3, 1, 40_000)[:, None]  # rows of very different size
    q, scales = quantize_rows(weight)
    assert q.dtype == torch.int8 and scales.dtype == torch.bfloat16 and scales.shape == (40_000,)
    assert q.abs().amax(dim=1).eq(127).all()  # each row's largest weight maps to +-127
    assert q.min() >= -127
    exact = weight.abs().amax(dim=1) / 127
    # per element, rounding to the grid costs at most half a step; the bf16 scale adds its own 2^-9 relative error
    step, exact = scales.float()[:, None], exact[:, None]
    assert ((q.float() * step - weight).abs() <= exact / 2 + 127 * (step - exact).abs() + 1e-6 * exact).all()


def test_prompt_passes_are_dense_and_decode_steps_int8():
    torch.manual_seed(1)
    linear = nn.Linear(64, 300, bias=True)
    layer = Int8DecodeLinear(linear)
    prompt = torch.randn(2, 7, 64)
    assert torch.equal(layer(prompt), linear(prompt))  # many positions per row: the dense weights, bit for bit
    step = torch.randn(3, 1, 64)
    got = layer(step)
    dequantized = layer.weight_int8.float() * layer.scales.float()[:, None]
    want = step.bfloat16().float() @ dequantized.T + linear.bias
    assert got.shape == (3, 1, 300) and torch.allclose(got, want, rtol=1e-2, atol=1e-2)
    # against the dense layer the error is bounded by half a quantization step per weight
    bound = step.abs() @ (layer.scales.float()[:, None].expand(300, 64) / 2).T
    assert ((got - linear(step)).abs() <= bound * 1.05 + 2e-2).all()
    assert not torch.equal(got, linear(step))  # the int8 path did run
    assert layer.weight is linear.weight  # the head's weight stays the tied dense one


def test_a_row_decodes_the_same_bits_alone_and_beside_others():
    torch.manual_seed(2)
    layer = Int8DecodeLinear(nn.Linear(640, 4096, bias=False).bfloat16())
    rows = torch.randn(5, 1, 640).bfloat16()
    together = layer(rows)
    assert all(torch.equal(layer(rows[i:i + 1]), together[i:i + 1]) for i in range(5))


def test_load_for_generation_quantizes_every_linear_on_cpu_and_dense_keeps_them(tiny_model_dir):
    int8, _, _ = load_for_generation(None, str(tiny_model_dir), precision="fp32")
    dense, _, _ = load_for_generation(None, str(tiny_model_dir), precision="fp32", decode_weights="dense")
    linears = [n for n, m in dense.named_modules() if isinstance(m, nn.Linear)]
    wrapped = [n for n, m in int8.named_modules() if isinstance(m, Int8DecodeLinear)]
    assert len(wrapped) == len(linears) > 0 and "lm_head" in wrapped
    assert not any(isinstance(m, Int8DecodeLinear) for m in dense.modules())
    ids = torch.tensor([[2, 10, 20, 30, 40, 50]])
    with torch.no_grad():
        assert torch.equal(int8(ids).logits, dense(ids).logits)  # the prompt pass is untouched
        step_int8, step_dense = (m(ids[:, -1:], cache=m(ids[:, :-1], use_cache=True).past_key_values,
                                   use_cache=True).logits[0, -1] for m in (int8, dense))
    assert 0 < (step_int8 - step_dense).abs().max() < 0.02 * step_dense.abs().max()


def test_an_unknown_decode_weights_fails_before_loading():
    with pytest.raises(UserError, match="decode_weights must be one of int8, dense, got 'int4'"):
        load_for_generation(None, "/nonexistent/model", decode_weights="int4")


@pytest.mark.parametrize("flag, quantized", [([], 1), (["--decode-weights", "dense"], 0)])
def test_the_ask_flag_reaches_the_loaded_model(tiny_model_dir, monkeypatch, capsys, flag, quantized):
    from medassist import ask, generate

    calls = []
    monkeypatch.setattr(generate, "quantize_for_decoding", lambda model: calls.append(model))
    assert ask.main(["--base-model", str(tiny_model_dir), "--max-new-tokens", "2", "--json", *flag,
                     "What is asthma?"]) == 0
    assert len(calls) == quantized and '"question": "What is asthma?"' in capsys.readouterr().out
