"""The LightningModule on a tiny random Gemma-3: loss, perplexity, frozen base, adapters, checkpoints."""

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from medassist import UserError
from medassist.data import collate, tokenize_example
from medassist.model import MedAssistLM

QA = [("What is asthma?", "Asthma is a condition of the airways that makes breathing hard at times."),
      ("How can I sleep better?", "Keep a regular bedtime, avoid screens late and keep the room dark."),
      ("What is a cold?", "A common cold is a mild virus infection of the nose and throat.")]


@pytest.fixture
def batch(tiny_tokenizer):
    rows = [tokenize_example(tiny_tokenizer, {"instruction": q, "output": a}, 128) for q, a in QA]
    return collate(rows, tiny_tokenizer.pad_token_id)


def make_module(tiny_model_dir, **kwargs):
    kwargs = {"quantization": "none", "precision": "fp32", "lora_dropout": 0.0, **kwargs}
    module = MedAssistLM(base_model=str(tiny_model_dir), **kwargs)
    module.configure_model()
    module.train()
    return module


def full_logits_nll(module, batch):
    """The straightforward loss: full logits, shift once, mean over supervised tokens."""
    logits = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), batch["labels"][:, 1:].reshape(-1),
                           reduction="sum")


def test_response_nll_matches_full_logits_and_counts_only_answer_tokens(tiny_model_dir, batch):
    module = make_module(tiny_model_dir)
    nll, n = module.response_nll(batch)
    assert n == (batch["labels"][:, 1:] != -100).sum()
    assert torch.allclose(nll, full_logits_nll(module, batch), rtol=1e-5)


def test_perplexity_is_exp_of_token_weighted_mean_nll(tiny_model_dir, batch):
    module = make_module(tiny_model_dir)
    module.eval()
    halves = [{k: v[:1] for k, v in batch.items()}, {k: v[1:] for k, v in batch.items()}]
    total, tokens = 0.0, 0
    with torch.no_grad():
        for half in halves:
            module.validation_step(half, 0)
            nll, n = module.response_nll(half)
            total, tokens = total + nll.item(), tokens + n.item()
    ppl = module.val_nll.compute().exp().item()
    assert ppl == pytest.approx(math.exp(total / tokens), rel=1e-5)
    assert ppl != pytest.approx(math.exp(sum(module.response_nll(h)[0].item() / module.response_nll(h)[1].item()
                                             for h in halves) / 2), rel=1e-4)  # not a mean of batch means


def test_lora_trains_and_leaves_base_weights_unchanged(tiny_model_dir, batch):
    module = make_module(tiny_model_dir, learning_rate=1e-2)
    base_before = {k: v.clone() for k, v in module.named_parameters() if not v.requires_grad}
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(10):
        nll, n = module.response_nll(batch)
        (nll / n).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append((nll / n).item())
    assert losses[-1] < 0.75 * losses[0] and losses[5] < losses[0]
    for name, param in module.named_parameters():
        if not param.requires_grad:
            assert torch.equal(param, base_before[name]), name


def test_int8_base_trains_on_cpu(tiny_model_dir, batch):
    module = make_module(tiny_model_dir, quantization="int8", learning_rate=1e-2)
    from bitsandbytes.nn import Linear8bitLt

    assert any(isinstance(m, Linear8bitLt) for m in module.modules())
    nll, n = module.response_nll(batch)
    (nll / n).backward()
    assert all(p.grad is not None for p in module.parameters() if p.requires_grad)


def test_refuses_lora_on_tied_embeddings(tiny_model_dir):
    with pytest.raises(UserError, match="lm_head"):
        MedAssistLM(base_model=str(tiny_model_dir), target_modules=["q_proj", "lm_head"])


def test_saved_adapter_reloads_in_a_fresh_process_with_the_same_logits(tiny_model_dir, batch, tmp_path):
    module = make_module(tiny_model_dir)
    for name, param in module.named_parameters():
        if "lora_B" in name:  # B starts at zero; give the adapter an effect
            torch.nn.init.normal_(param, std=0.05)
    module.eval()
    with torch.no_grad():
        expected = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    adapter = module.save_adapter(tmp_path / "lora_adapter")
    assert {"adapter_config.json", "adapter_model.safetensors", "medassist.json"} <= {p.name for p in adapter.iterdir()}
    assert json.loads((adapter / "medassist.json").read_text())["template"] == "gemma-turn-v1"
    torch.save(batch, tmp_path / "batch.pt")
    script = f"""
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base = AutoModelForCausalLM.from_pretrained({str(tiny_model_dir)!r}, dtype=torch.float32)
model = PeftModel.from_pretrained(base, {str(adapter)!r}).eval()
batch = torch.load({str(tmp_path / 'batch.pt')!r})
with torch.no_grad():
    torch.save(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, {str(tmp_path / 'logits.pt')!r})
"""
    subprocess.run([sys.executable, "-c", script], check=True)
    reloaded = torch.load(tmp_path / "logits.pt")
    assert torch.allclose(reloaded, expected, atol=1e-5)


def test_checkpoint_holds_only_the_adapter(tiny_model_dir):
    module = make_module(tiny_model_dir)
    full = module.state_dict()
    checkpoint = {"state_dict": dict(full)}
    module.on_save_checkpoint(checkpoint)
    kept = checkpoint["state_dict"]
    assert kept and all("lora_" in k for k in kept)
    assert len(kept) < len(full) and checkpoint["medassist"]["template"] == "gemma-turn-v1"
