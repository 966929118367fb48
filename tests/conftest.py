"""Shared fixtures: a tiny randomly initialised Gemma-3 with a tiny BPE tokenizer, saved as a model directory.

Everything loads it through the same `load_model`/`load_tokenizer` path as the real model (a local directory).
"""

import json
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def make_tiny_model(directory: Path, vocab_size: int = 384, seed: int = 0) -> Path:
    """Save a 2-layer Gemma-3 (hidden 64) and a BPE tokenizer trained on the bundled data to `directory`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = []
    for line in (ROOT / "data" / "train.jsonl").read_text().splitlines()[:200]:
        record = json.loads(line)
        texts += [record["instruction"], record["output"]]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                        pad_token="<pad>", unk_token="<unk>",
                                        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"])
    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=1024,
        sliding_window=64, layer_types=["sliding_attention", "full_attention"],
        initializer_range=0.2,  # the default 0.02 gives near-uniform logits that LoRA alone can hardly move
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    model = Gemma3ForCausalLM(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-gemma3"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from medassist.loading import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="session")
def adapter(tiny_model_dir, tmp_path_factory) -> Path:
    """A LoRA adapter for the tiny model, saved by the real `save_adapter`, with non-zero B so it changes outputs."""
    from medassist.model import MedAssistLM

    module = MedAssistLM(base_model=str(tiny_model_dir), quantization="none", precision="fp32")
    module.configure_model()
    for name, param in module.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    return module.save_adapter(tmp_path_factory.mktemp("run") / "lora_adapter")
