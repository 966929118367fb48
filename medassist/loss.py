"""The answer-only loss: cross-entropy of the supervised positions, computed without ever holding the full
(tokens x vocabulary) logits. Gemma's vocabulary is 262k entries, so full fp32 logits of one 8 x 384 batch are 3 GB."""

import math

import torch
import torch.nn.functional as F

from medassist import UserError

FP32_BYTES = 4


def chunked_cross_entropy(hidden, weight, targets, chunk_bytes: int = 32 * 2**20, softcap: float | None = None):
    """Sum of token NLLs of `targets` under logits `hidden @ weight.T`, holding at most `chunk_bytes` of fp32 logits
    at a time (peak memory about twice that, whatever the number of tokens: 64 MiB for the default).

    hidden: (N, d) states at supervised positions only; weight: (V, d) frozen output embedding; targets: (N,).
    A chunk is laid out as (chunk_bytes / 4 / 8192 tokens) x (8192 vocabulary entries): wide matmuls over many tokens
    make the loss ~2.5x faster on a CPU than a few tokens x the whole vocabulary (BENCHMARKS.md). Log-sum-exps are
    merged across vocabulary blocks online, in fp32, and the gradient with respect to `hidden`, softmax @ W - W[y],
    is accumulated in the same pass, so backward costs nothing.
    """
    if weight.requires_grad:
        raise UserError("the output embedding must stay frozen (do not train lm_head/embed_tokens)")
    return _ChunkedCrossEntropy.apply(hidden, weight, targets, chunk_bytes, softcap)


class _ChunkedCrossEntropy(torch.autograd.Function):
    VOCAB_BLOCK = 8192  # vocabulary entries per block (of 4096-32768, measured fastest; BENCHMARKS.md)

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_bytes, softcap):
        grad = ctx.needs_input_grad[0]
        block = min(len(weight), _ChunkedCrossEntropy.VOCAB_BLOCK)
        tokens = max(1, chunk_bytes // (FP32_BYTES * block))  # chunk_bytes of fp32 logits, as tokens x block
        total, grads = torch.zeros((), dtype=torch.float32, device=hidden.device), []
        for h, y in zip(hidden.split(tokens), targets.split(tokens)):
            lse, acc = _ChunkedCrossEntropy._chunk(h, weight, block, softcap, grad)
            w_y = weight[y].float()
            z_y = (h.float() * w_y).sum(-1, keepdim=True)  # the target's logit
            if softcap:
                capped = torch.tanh(z_y / softcap)
                z_y, w_y = capped * softcap, w_y * (1 - capped.square())
            total += (lse - z_y).sum()
            grads.append(acc - w_y if grad else None)
        if grad:
            ctx.save_for_backward(torch.cat(grads).to(hidden.dtype) if grads else torch.zeros_like(hidden))
        return total

    @staticmethod
    def _chunk(h, weight, block, softcap, grad):
        """(log-sum-exp, softmax @ W) of the logits h @ W.T, merged online over the vocabulary blocks, in fp32."""
        lse = torch.full((len(h), 1), -math.inf, device=h.device)  # log-sum-exp of the blocks so far
        acc = torch.zeros(h.shape, device=h.device)  # softmax @ W of the blocks so far
        for w in weight.split(block):
            block_lse, block_grad = _ChunkedCrossEntropy._block(h, w, softcap, grad)
            merged = torch.logaddexp(lse, block_lse)
            if grad:
                acc.mul_((lse - merged).exp_()).add_(block_grad.mul_((block_lse - merged).exp_()))
            lse = merged
        return lse, acc

    @staticmethod
    def _block(h, w, softcap, grad):
        """(log-sum-exp, softmax @ w) of the logits h @ w.T, in fp32; its temporaries are freed on return."""
        z = F.linear(h, w).float()
        if softcap:  # Gemma 2 caps its final logits: z = c * tanh(x / c)
            z = z.div_(softcap).tanh_().mul_(softcap)
        logp = torch.log_softmax(z, -1)
        lse = z[:, :1] - logp[:, :1]  # read back from any one column
        if not grad:
            return lse, None
        probs = logp.exp_()
        if softcap:  # dz/dx = 1 - (z / c)^2
            probs.addcmul_(probs, z.div_(softcap).square_(), value=-1)
        del z  # at most two block-sized fp32 tensors are alive at once
        return lse, (probs.to(w.dtype) @ w).float()

    @staticmethod
    def backward(ctx, grad_total):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_total.to(grad_hidden.dtype), None, None, None, None
