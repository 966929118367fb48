"""The LightningModule on a tiny random Gemma-3: loss, perplexity (validation and test), per-token gradient weighting
across accumulated micro-batches, frozen base, adapters, checkpoints."""

import json
import math
import subprocess
import sys

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from medassist import UserError
from medassist.data import InstructionDataModule, collate, read_records, tokenize_example
from medassist.model import MedAssistLM
from medassist.prompts import TEMPLATE_NAME

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
    assert json.loads((adapter / "medassist.json").read_text())["template"] == TEMPLATE_NAME
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
    assert len(kept) < len(full) and checkpoint["medassist"]["template"] == TEMPLATE_NAME


@pytest.fixture
def jsonl(tmp_path):
    """8 training pairs whose answers differ in length (so a step's tokens differ from the mean), 3 test pairs."""
    def write(name, pairs):
        path = tmp_path / name
        path.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in pairs))
        return str(path)

    long = " ".join(a for _, a in QA)
    train = [(q, a) for q, a in QA] + [(q + " Explain.", long) for q, _ in QA] + [("Why?", "Because."), ("Ok?", "Yes.")]
    return write("train.jsonl", train), write("test.jsonl", QA)


def quiet_trainer(tmp_path, **kwargs):
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                     default_root_dir=tmp_path, **kwargs)


class Record(L.Callback):
    """The adapter weights before training, every micro-batch, and the gradients the optimizer step uses."""

    def __init__(self):
        self.batches, self.grads = [], None

    def on_train_start(self, trainer, pl_module):
        self.start = {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(batch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 1 and self.grads is None:  # after the step; zeroed before the next window
            self.grads = {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.requires_grad}


def test_an_accumulated_step_weighs_every_supervised_token_the_same(tiny_model_dir, jsonl, tmp_path):
    """The gradient of one optimizer step over 2 micro-batches is the exact per-token mean of the whole window:
    sum of token NLL gradients / the window's supervised tokens, not / a dataset-mean constant."""
    train, _ = jsonl
    data = InstructionDataModule(base_model=str(tiny_model_dir), train_file=train, val_file=train, batch_size=2)
    module = MedAssistLM(base_model=str(tiny_model_dir), quantization="none", precision="fp32", lora_dropout=0.0)
    record = Record()
    quiet_trainer(tmp_path, max_steps=1, accumulate_grad_batches=2, callbacks=[record]).fit(module, datamodule=data)

    assert len(record.batches) == 2
    tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in record.batches)
    assert abs(tokens - 2 * data.tokens_per_batch) > 0.1 * tokens  # the old constant would give another gradient
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.requires_grad:
                param.copy_(record.start[name])
    module.zero_grad()
    (sum(module.response_nll(b)[0] for b in record.batches) / tokens).backward()
    for name, param in module.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(record.grads[name], param.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_batch_4_trains_the_same_adapter_as_batch_2_accumulated_twice(tiny_model_dir, jsonl, tmp_path):
    train, _ = jsonl
    adapters = []
    for batch_size, accumulate in ((4, 1), (2, 2)):
        torch.manual_seed(0)
        data = InstructionDataModule(base_model=str(tiny_model_dir), train_file=train, val_file=train,
                                     batch_size=batch_size)
        module = MedAssistLM(base_model=str(tiny_model_dir), quantization="none", precision="fp32", lora_dropout=0.0,
                             learning_rate=1e-2, warmup_steps=0)
        quiet_trainer(tmp_path / f"b{batch_size}", max_steps=4, accumulate_grad_batches=accumulate,
                      gradient_clip_val=0.1).fit(module, datamodule=data)  # clipping on: it sees the weighting too
        adapters.append({n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad})
    assert any(w.abs().sum() > 0 for n, w in adapters[0].items() if "lora_B" in n)  # it trained (B starts at 0)
    # Adam divides each step by the gradient's own size, so the rounding of near-zero gradients summed in another
    # order moves a weight by up to 1.3e-5 after these 4 steps (measured on an Intel Xeon; < 1e-6 on an AMD Zen 4);
    # the gradients themselves are compared at 1e-4 above
    for name, weight in adapters[0].items():
        torch.testing.assert_close(adapters[1][name], weight, rtol=1e-4, atol=3e-5, msg=name)


def test_test_step_is_the_perplexity_of_the_test_answers(tiny_model_dir, jsonl, tmp_path):
    train, test = jsonl
    data = InstructionDataModule(base_model=str(tiny_model_dir), train_file=train, val_file=train, test_file=test,
                                 batch_size=2)
    module = MedAssistLM(base_model=str(tiny_model_dir), quantization="none", precision="fp32")
    (metrics,) = quiet_trainer(tmp_path).test(module, datamodule=data)

    rows = [tokenize_example(data.tokenizer, r, data.max_seq_length) for r in read_records(test)]
    with torch.no_grad():
        nll, n = module.response_nll(collate(rows, data.tokenizer.pad_token_id))  # all 3 at once: token-weighted
    assert metrics["test/ppl"] == pytest.approx(math.exp(nll.item() / n.item()), rel=1e-4)
    assert metrics["test/loss"] == pytest.approx(nll.item() / n.item(), rel=1e-4)


def test_test_without_a_test_file_says_which_option_to_give(tiny_model_dir, jsonl, tmp_path):
    train, _ = jsonl
    data = InstructionDataModule(base_model=str(tiny_model_dir), train_file=train, val_file=train)
    module = MedAssistLM(base_model=str(tiny_model_dir), quantization="none", precision="fp32")
    with pytest.raises(UserError, match="--data.test_file"):
        quiet_trainer(tmp_path).test(module, datamodule=data)


def test_validation_reports_first_answers_and_follow_ups_apart(tiny_model_dir, tmp_path):
    chat = {"messages": [{"role": "user", "content": QA[0][0]}, {"role": "assistant", "content": QA[0][1]},
                         {"role": "user", "content": "And in children?"},
                         {"role": "assistant", "content": "Children can have asthma too."}]}
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps(r) + "\n" for r in [{"instruction": QA[1][0], "output": QA[1][1]}, chat]))
    data = InstructionDataModule(base_model=str(tiny_model_dir), train_file=str(val), val_file=str(val), batch_size=2)
    module = MedAssistLM(base_model=str(tiny_model_dir), quantization="none", precision="fp32")
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    (metrics,) = trainer.validate(module, datamodule=data)

    batch = collate([tokenize_example(data.tokenizer, r, 512) for r in read_records(val)], data.tokenizer.pad_token_id)
    follow = batch["followup"].bool()
    with torch.no_grad():
        (first, n_first), (later, n_later) = module.response_nlls(batch, [~follow, follow])
    assert n_later == len(data.tokenizer("Children can have asthma too.", add_special_tokens=False)["input_ids"]) + 1
    assert metrics["val/ppl_single"] == pytest.approx(math.exp(first.item() / n_first.item()), rel=1e-4)
    assert metrics["val/ppl_followup"] == pytest.approx(math.exp(later.item() / n_later.item()), rel=1e-4)
    total = (first + later).item() / (n_first + n_later).item()
    assert metrics["val/ppl"] == pytest.approx(math.exp(total), rel=1e-4)  # every answer token, token-weighted
