"""The fast answer-only loss equals the plain full-logits cross-entropy, gradients included, and its memory stays
bounded by the chunk budget (loss_chunk_mib) whatever the number of tokens (Gemma's vocabulary is 262k)."""

import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_leaves
from torch.utils._python_dispatch import TorchDispatchMode

from medassist.data import IGNORE_INDEX, collate, tokenize_example
from medassist.loss import _ChunkedCrossEntropy, chunked_cross_entropy
from medassist.model import MIB, MedAssistLM

RECORDS = [
    {"instruction": "What is the common cold?", "output": "A mild viral infection of the nose and throat."},
    {"instruction": "Define hypertension.", "input": "In one sentence.", "output": "High blood pressure."},
    {"instruction": "What does a fever mean, and when should I worry about one in an adult?",
     "output": "A fever is a raised body temperature, usually from an infection; see a doctor if it lasts."},
]


def full_logits_nll(hidden, weight, targets, softcap=None):
    logits = hidden.float() @ weight.float().T
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, targets, reduction="sum")


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    """A tiny fp32 Gemma-3 with LoRA on every linear, B initialised non-zero so every adapter weight gets a gradient."""
    lm = MedAssistLM(base_model=str(tiny_model_dir), quantization="none", precision="fp32", lora_dropout=0.0)
    lm.configure_model()
    torch.manual_seed(0)
    for name, p in lm.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return lm


@pytest.fixture(scope="module")
def batch(tiny_tokenizer):
    """Three examples of different lengths: right padding, prompt tokens masked, padding masked."""
    rows = [tokenize_example(tiny_tokenizer, r, 128) for r in RECORDS]
    return collate(rows, tiny_tokenizer.pad_token_id)


def assert_close(ours, ref, **kwargs):
    """Equal to 1e-5 of the tensor's scale: fp32 sums taken in another order differ in the last digits."""
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()), **kwargs)


def lora_grads(lm):
    return {n: p.grad.clone() for n, p in lm.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("chunk_size, vocab_block", [(1, 8192), (3, 8192), (7, 100), (3, 64), (1000, 8192)])
def test_response_nll_equals_full_logits(lm, batch, monkeypatch, chunk_size, vocab_block):
    """chunk_size: rows of the whole vocabulary per chunk, given as the MiB of fp32 logits they take."""
    monkeypatch.setattr(_ChunkedCrossEntropy, "VOCAB_BLOCK", vocab_block)  # small blocks: vocabulary blocking runs
    vocab = lm.model.get_base_model().get_output_embeddings().weight.shape[0]
    monkeypatch.setitem(lm.hparams, "loss_chunk_mib", chunk_size * vocab * 4 / MIB)
    assert (batch["attention_mask"] == 0).any() and (batch["labels"] == IGNORE_INDEX).any()

    lm.model.zero_grad()
    nll, n = lm.response_nll(batch)
    nll.backward()
    ours = lora_grads(lm)

    lm.model.zero_grad()
    logits = lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]  # the one shift
    ref = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    ref.backward()

    assert n == (labels != IGNORE_INDEX).sum() > 0
    assert_close(nll, ref)
    for name, grad in lora_grads(lm).items():
        assert_close(ours[name], grad, msg=name)


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("chunk_size, vocab_block", [(1, 8192), (2, 64), (5, 33), (64, 8192)])
def test_equals_full_logits_on_hidden_states(monkeypatch, softcap, chunk_size, vocab_block):
    monkeypatch.setattr(_ChunkedCrossEntropy, "VOCAB_BLOCK", vocab_block)
    torch.manual_seed(0)
    hidden = torch.randn(37, 16)  # 37 tokens: no chunk size divides them
    weight = torch.randn(250, 16)  # 250 entries: uneven vocabulary blocks
    targets = torch.randint(0, 250, (37,))
    h1, h2 = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()

    ours = chunked_cross_entropy(h1, weight, targets, chunk_size * len(weight) * 4, softcap)
    ref = full_logits_nll(h2, weight, targets, softcap)
    (2 * ours).backward()  # a non-unit upstream gradient
    (2 * ref).backward()

    assert_close(ours, ref)
    assert_close(h1.grad, h2.grad)


def test_bf16_close_to_fp32():
    torch.manual_seed(0)
    hidden, weight = torch.randn(50, 32), torch.randn(3000, 32) * 0.3
    targets = torch.randint(0, 3000, (50,))
    h = hidden.bfloat16().requires_grad_()
    ours = chunked_cross_entropy(h, weight.bfloat16(), targets)
    ours.backward()
    h32 = hidden.bfloat16().float().requires_grad_()
    ref = full_logits_nll(h32, weight.bfloat16().float(), targets)
    ref.backward()
    assert ours.dtype == torch.float32 and h.grad.dtype == torch.bfloat16
    torch.testing.assert_close(ours, ref, rtol=1e-3, atol=0)
    torch.testing.assert_close(h.grad.float(), h32.grad, rtol=0.05, atol=2e-3)


def test_no_supervised_tokens(lm, batch):
    hidden = torch.zeros(0, 16, requires_grad=True)
    nll = chunked_cross_entropy(hidden, torch.randn(250, 16), torch.zeros(0, dtype=torch.long), 4000, 3.0)
    nll.backward()
    assert nll.item() == 0 and hidden.grad.shape == (0, 16)

    masked = dict(batch, labels=torch.full_like(batch["labels"], IGNORE_INDEX))
    nll, n = lm.response_nll(masked)
    assert n == 0 and nll.item() == 0


def test_trained_output_embedding_is_refused():
    with pytest.raises(Exception, match="frozen"):
        chunked_cross_entropy(torch.randn(2, 4), torch.randn(10, 4, requires_grad=True), torch.tensor([1, 2]))


class LiveBytes(TorchDispatchMode):
    """Storage allocated by the ops run inside: bytes alive now, at the peak, and the largest single allocation."""

    def __init__(self):
        super().__init__()
        self.now = self.peak = self.largest = 0
        self.live = set()

    def _free(self, ptr, nbytes):
        self.live.discard(ptr)
        self.now -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            ptr, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or ptr in inputs or ptr in self.live:  # views and in-place results allocate nothing
                continue
            self.live.add(ptr)
            self.now += nbytes
            self.peak, self.largest = max(self.peak, self.now), max(self.largest, nbytes)
            weakref.finalize(storage, self._free, ptr, nbytes)
        return out


def test_memory_is_bounded_by_the_chunk_budget():
    """Gemma-sized vocabulary, 1000 tokens: full logits would be 1 GB; the loss holds ~2 x chunk_size x V floats."""
    vocab, tokens, chunk_size = 262144, 1000, 4
    torch.manual_seed(0)
    hidden = torch.randn(tokens, 8, requires_grad=True)
    weight, targets = torch.randn(vocab, 8), torch.randint(0, vocab, (tokens,))
    budget = chunk_size * vocab * 4  # bytes of one fp32 block: 4 MB
    with LiveBytes() as mem:
        chunked_cross_entropy(hidden, weight, targets, chunk_bytes=budget).backward()
    assert mem.largest <= budget
    assert mem.peak <= 2.5 * budget  # measured: 2.0 x budget + the saved (tokens, 8) gradient
    assert mem.peak < tokens * vocab * 4 / 50  # full fp32 logits: 1 GB


def test_chunk_budget_is_memory_and_the_old_knob_still_means_rows_of_the_vocabulary(tiny_model_dir):
    """loss_chunk_mib is MiB of fp32 logits; the old loss_chunk_size (rows x vocabulary) maps to the same bytes."""
    vocab = 262144
    new = MedAssistLM(base_model=str(tiny_model_dir), loss_chunk_mib=32)
    old = MedAssistLM(base_model=str(tiny_model_dir), loss_chunk_size=32)
    assert new._chunk_bytes(vocab) == old._chunk_bytes(vocab) == 32 * MIB  # 32 rows x 262k x 4 B = 32 MiB
    assert MedAssistLM(base_model=str(tiny_model_dir), loss_chunk_mib=250)._chunk_bytes(256000) == 256 * 256000 * 4
    with pytest.raises(Exception, match="loss_chunk_mib must be positive"):
        MedAssistLM(base_model=str(tiny_model_dir), loss_chunk_mib=0)
