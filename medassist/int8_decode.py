"""Weight-only int8 linears for decoding on a CPU: each generated token reads int8 weights instead of bf16 or fp32.

Decoding one token of gemma-3-270m is bound by reading its weights: 268 M of them per token, 168 M in the tied
262k x 640 head. `torch._weight_int8pack_mm` (aten's weight-only int8 kernel, with AVX2 and
AVX-512 builds on CPU) multiplies bf16 activations by int8 rows with one scale per row, so a token reads 1 byte per
weight. Measured on 2 cores of an AMD EPYC Zen 5 (BENCHMARKS.md): the head for one row in 6.9 ms against 18.4 ms in
bf16 and 55 ms in fp32.

Why by hand: torchao 0.18's `Int8WeightOnlyConfig` dequantizes the whole weight on every call on CPU
(copy + mm + mul: 270 ms for the head, against 20 ms for the int8 kernel, same machine and load), and
`torch.ao.quantization.quantize_dynamic` also rounds the activations to 8 bits.

Only steps that feed one position per row (decoding; the head during the prompt pass, which `generate` gives only
the last position) use the int8 weights; the prompt pass keeps the dense weights, where oneDNN's GEMM is faster
(59 ms int8 vs 30 ms bf16 for the head at 28 rows), so the dense weights stay in memory beside the int8 copy.
A row's result does not depend on the other rows of the step, so batched answers stay those a request gets alone.
"""

import torch
import torch.nn as nn

# rows quantized at a time: bounds the fp32 copy made while quantizing the 262k-row head (16k x 640 x 4 bytes)
_CHUNK_ROWS = 16384


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, bf16 scales): symmetric, one scale per output row, scale = max |w| / 127 of that row."""
    q = torch.empty(weight.shape, dtype=torch.int8)
    scales = torch.empty(weight.shape[0], dtype=torch.float32)
    for start in range(0, weight.shape[0], _CHUNK_ROWS):
        block = weight[start:start + _CHUNK_ROWS].detach().float()
        scale = block.abs().amax(dim=1).clamp(min=1e-12) / 127
        q[start:start + _CHUNK_ROWS] = torch.round(block / scale[:, None]).to(torch.int8)
        scales[start:start + _CHUNK_ROWS] = scale
    return q, scales.to(torch.bfloat16)


class Int8DecodeLinear(nn.Module):
    """A linear layer that keeps its dense weights for the prompt pass and multiplies in int8 for decode steps."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear
        weight_int8, scales = quantize_rows(linear.weight)
        # not saved with the model: derived from the dense weights, rebuilt at load
        self.register_buffer("weight_int8", weight_int8, persistent=False)
        self.register_buffer("scales", scales, persistent=False)

    @property
    def weight(self) -> nn.Parameter:  # callers that read the head's weight (tied embeddings, merge) see the dense one
        return self.linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[-2] != 1:  # a prompt pass: many positions per row
            return self.linear(x)
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()
        y = torch._weight_int8pack_mm(flat, self.weight_int8, self.scales).to(x.dtype)
        if self.linear.bias is not None:
            y = y + self.linear.bias
        return y.reshape(*x.shape[:-1], y.shape[-1])


def quantize_for_decoding(model: nn.Module) -> int:
    """Replace every nn.Linear of a CPU model (merged, unquantized) by an Int8DecodeLinear; returns how many."""
    targets = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
               if isinstance(child, nn.Linear)]
    for parent, name in targets:
        setattr(parent, name, Int8DecodeLinear(getattr(parent, name)))
    return len(targets)
