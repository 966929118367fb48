"""The peers `scripts/benchmark.py` times, one per function; each runs in its own process and returns one dict.

Training peers train the same LoRA (same seed, `medassist.loading.lora_config`) on the same examples in the same
order (ours' length-grouped sampler), with the same precision, threads and optimizer settings:
  medassist: MedAssistLM through lightning.Trainer (logits only at answer tokens);
  tuned:     transformers.Trainer + peft, dynamic padding to a multiple of 8, the model's own loss;
  trl:       trl.SFTTrainer, pre-tokenized prompt-completion rows, completion_only_loss (its fused, chunked head);
  seed:      transformers.Trainer padded to --seq-len: the recipe medassist replaced, for reference.
Generation peers use the adapter the medassist run wrote: ours (`load_for_generation`: int8 decode weights on CPU),
`dense` (ours with decode_weights="dense"), `merged` (peft merge_and_unload, plain generate) and `seed` (PeftModel
on the quantized base, unmerged). Besides speed, each but `seed` reports `answer_nll` on validation answers.
"""

import os
import resource
import time
from pathlib import Path

import torch
import yaml

from medassist.data import IGNORE_INDEX

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "What are the common symptoms of type 2 diabetes, and when should someone see a doctor?"


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def peak_memory_mb() -> float:
    """GPU: peak allocated by torch; CPU: peak resident set of this process (ru_maxrss is in KiB on Linux)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def flops_per_token(model) -> tuple[int, int]:
    """(FLOPs per token of forward + backward through the frozen linears and the LoRA, FLOPs per lm_head token).

    Frozen weights: forward 2 x params, backward only the input gradient, 2 x params. LoRA: 6 x params (its weight
    gradients too). The output head: logits plus their input gradient, 4 x V x d. Attention scores are left out
    (a few percent at these lengths).
    """
    frozen = sum(m.in_features * m.out_features for name, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and "lora_" not in name and not name.endswith("lm_head"))
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    vocab, hidden = model.get_output_embeddings().weight.shape
    return 4 * frozen + 6 * lora, 4 * vocab * hidden


def batch_tokens(batch) -> tuple[int, int, int]:
    """(real tokens, supervised tokens, padded width) of a collated batch; labels are unshifted (the model shifts)."""
    return (int(batch["attention_mask"].sum()), int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()),
            batch["input_ids"].shape[1])


def config() -> dict:
    return yaml.safe_load((ROOT / "configs" / "lora.yaml").read_text())


def datamodule(args):
    from medassist.data import InstructionDataModule

    data = config()["data"] | dict(base_model=args.model, max_seq_length=args.seq_len, batch_size=args.batch_size)
    dm = InstructionDataModule(**data)
    dm.setup("fit")
    return dm


class Steps:
    """Per optimizer step: seconds, CPU seconds, loss, (real, supervised, width); the LoRA checksum at the start."""

    def __init__(self):
        self.seconds, self.cpu_seconds, self.losses, self.tokens, self.lora_checksum = [], [], [], [], None

    def begin(self, model):
        if self.lora_checksum is None:
            self.lora_checksum = sum(p.double().abs().sum().item() for p in model.parameters() if p.requires_grad)
        sync()
        self.start = time.perf_counter(), time.process_time()

    def end(self):
        sync()
        self.seconds.append(time.perf_counter() - self.start[0])
        self.cpu_seconds.append(time.process_time() - self.start[1])  # less sensitive to other processes

    def summary(self, args, model, lm_head_on_response: bool) -> dict:
        """Throughput over the timed steps (after args.warmup); FLOPs count what this side executes."""
        per_token, per_head = flops_per_token(model)
        self.tokens = self.tokens[: len(self.seconds)]  # accelerate's loader collates one batch ahead
        timed = slice(args.warmup, None)
        seconds, cpu_seconds = sum(self.seconds[timed]), sum(self.cpu_seconds[timed])
        tokens, response, width = (sum(x) for x in zip(*self.tokens[timed]))
        flops = sum(args.batch_size * w * per_token + (r if lm_head_on_response else args.batch_size * w) * per_head
                    for _, r, w in self.tokens[timed])
        return dict(tokens_per_s=tokens / seconds, response_tokens_per_s=response / seconds,
                    tokens_per_cpu_s=tokens / cpu_seconds, cpu_s=self.cpu_seconds,
                    padded_tokens_per_s=args.batch_size * width / seconds, step_s=self.seconds, losses=self.losses,
                    loss=self.losses[-1], tokens=self.tokens, tflops=flops / seconds / 1e12,
                    dtype=str(model.get_output_embeddings().weight.dtype).removeprefix("torch."),
                    lora_checksum=self.lora_checksum, peak_memory_mb=peak_memory_mb(), loadavg=os.getloadavg())


# ---- training peers -------------------------------------------------------------------------------------------
def train_medassist(args) -> dict:
    import lightning as L

    from medassist.model import MedAssistLM

    class Meter(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            steps.begin(pl_module)
            steps.tokens.append(batch_tokens(batch))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            steps.end()
            steps.losses.append(float(trainer.callback_metrics["train/loss"]))

    cfg, steps = config(), Steps()
    # Constant learning rate, as the HF peers: no warm-up, cosine floor = 1.
    hp = cfg["model"] | dict(base_model=args.model, quantization=args.quant, precision=args.precision,
                             warmup_steps=0, min_lr_ratio=1.0)
    dm, lm = datamodule(args), MedAssistLM(**hp)
    L.seed_everything(cfg["seed_everything"])
    trainer = L.Trainer(accelerator="auto", devices=1, precision="32-true", max_steps=args.warmup + args.steps,
                        gradient_clip_val=cfg["trainer"]["gradient_clip_val"], logger=False, callbacks=[Meter()],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=args.workdir)
    trainer.fit(lm, datamodule=dm)  # AdapterCheckpoint writes workdir/lora_adapter: the generation peers use it
    return steps.summary(args, lm.model, lm_head_on_response=True)


def our_rows(args, dm) -> list[dict]:
    """The examples ours trains on, in ours' order (its length-grouped sampler), one epoch's worth for the run."""
    order = list(dm.train_dataloader().sampler)[: args.batch_size * (args.warmup + args.steps)]
    return [{k: dm.train_set[i][k] for k in ("input_ids", "labels")} for i in order]


def lora_model(args, hp):
    """The base as ours loads it, wrapped by peft with ours' LoraConfig, initialised from ours' seed."""
    from peft import get_peft_model

    from medassist.loading import load_model, lora_config

    torch.manual_seed(config()["seed_everything"])  # same LoRA initialisation as ours (checked by lora_checksum)
    base = load_model(args.model, args.quant, args.precision, hp["attn_implementation"], device())
    # lora.yaml's optional variants (DoRA, rsLoRA, init), where it sets them, as ours reads them
    variants = {k: hp[k] for k in ("use_dora", "use_rslora", "init_lora_weights") if k in hp}
    return get_peft_model(base, lora_config(hp["lora_r"], hp["lora_alpha"], hp["lora_dropout"], hp["target_modules"],
                                            **variants))


def hf_arguments(args, sampler: str, cls=None, **extra):
    """TrainingArguments (or SFTConfig) of ours' optimizer: AdamW, same lr, weight decay, clipping, constant rate,
    fp32 LoRA over the base's compute dtype (no autocast). sampler "sequential" keeps ours' order of our_rows;
    "group_by_length" lets transformers' LengthGroupedSampler batch the same examples its own way."""
    from transformers import TrainingArguments

    cfg = config()
    hp = cfg["model"]
    return (cls or TrainingArguments)(
        output_dir=str(Path(args.workdir) / "hf"), per_device_train_batch_size=args.batch_size,
        max_steps=args.warmup + args.steps, learning_rate=hp["learning_rate"], weight_decay=hp["weight_decay"],
        lr_scheduler_type="constant", optim="adamw_torch", max_grad_norm=cfg["trainer"]["gradient_clip_val"],
        train_sampling_strategy=sampler, gradient_checkpointing=hp["gradient_checkpointing"],
        bf16=False, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(), seed=cfg["seed_everything"], **extra)


class Recorded:
    """A collator that records what each batch it builds holds: the peers' real batches, not what we expect."""

    def __init__(self, collate, steps: Steps):
        self.collate, self.steps = collate, steps

    def __call__(self, features):
        batch = self.collate(features)
        self.steps.tokens.append(batch_tokens(batch))
        return batch


def meter(steps: Steps):
    from transformers import TrainerCallback

    class Meter(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            steps.begin(model)

        def on_step_end(self, args, state, control, **kwargs):
            steps.end()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                steps.losses.append(float(logs["loss"]))

    return Meter()


def tuned_collator(tokenizer, max_length: int | None = None):
    """Dynamic padding to the batch's longest example, rounded up to a multiple of 8 (ours does the same); labels
    padded with the ignore index. max_length: pad every batch to it instead (the seed recipe)."""
    from transformers import DataCollatorForSeq2Seq

    if max_length:
        return DataCollatorForSeq2Seq(tokenizer, padding="max_length", max_length=max_length,
                                      label_pad_token_id=IGNORE_INDEX)
    return DataCollatorForSeq2Seq(tokenizer, padding="longest", pad_to_multiple_of=8, label_pad_token_id=IGNORE_INDEX)


def _hf_train(args, padded_to: int | None, sampler: str) -> dict:
    from datasets import Dataset
    from transformers import Trainer

    hp, dm, steps = config()["model"], datamodule(args), Steps()
    rows = our_rows(args, dm)
    model = lora_model(args, hp)
    dm.tokenizer.padding_side = "right"  # Gemma gave NaN logits in training with left padding (transformers #30004)
    collator = Recorded(tuned_collator(dm.tokenizer, padded_to), steps)
    Trainer(model=model, args=hf_arguments(args, sampler), train_dataset=Dataset.from_list(rows),
            data_collator=collator, callbacks=[meter(steps)]).train()
    return steps.summary(args, model, lm_head_on_response=False)


def train_tuned(args) -> dict:
    """transformers.Trainer as a user would tune it: dynamic padding, length-grouped batches, same masking."""
    return _hf_train(args, padded_to=None, sampler=args.tuned_sampler) | dict(sampler=args.tuned_sampler)


def train_seed(args) -> dict:
    """The recipe medassist replaced: every batch padded to --seq-len, logits for every position."""
    return _hf_train(args, padded_to=args.seq_len, sampler="sequential")


def train_trl(args) -> dict:
    """trl.SFTTrainer on ours' tokens as a prompt-completion dataset: completion_mask = ours' answer positions."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    hp, dm, steps = config()["model"], datamodule(args), Steps()
    rows = [dict(input_ids=r["input_ids"], completion_mask=[int(t != IGNORE_INDEX) for t in r["labels"]])
            for r in our_rows(args, dm)]
    model = lora_model(args, hp)
    dm.tokenizer.padding_side = "right"
    # SFTConfig turns gradient checkpointing on by default; hf_arguments sets ours (off in lora.yaml)
    sft = hf_arguments(args, args.tuned_sampler, SFTConfig, completion_only_loss=True, pad_to_multiple_of=8,
                       max_length=args.seq_len, packing=False, padding_free=False)
    trainer = SFTTrainer(model=model, args=sft, train_dataset=Dataset.from_list(rows), processing_class=dm.tokenizer,
                         callbacks=[meter(steps)])
    trainer.data_collator = Recorded(trainer.data_collator, steps)  # built by TRL; the loaders read it later
    trainer.train()
    # TRL's fused head computes log-probs at every position, not only answer tokens
    return steps.summary(args, model, lm_head_on_response=False) | dict(trl=__import__("trl").__version__)


# ---- generation peers -----------------------------------------------------------------------------------------
def time_generation(model, tokenizer, new_tokens: int) -> dict:
    """Time to first token and tokens/s of greedy decoding with a KV cache; exactly `new_tokens` tokens each time."""
    from medassist.generate import context_length, prompt_ids

    ids = torch.tensor([prompt_ids(tokenizer, QUESTION, context_length(model), new_tokens)], device=model.device)

    def run(n):
        sync()
        start, cpu = time.perf_counter(), time.process_time()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                 min_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=tokenizer.pad_token_id)
        sync()
        return time.perf_counter() - start, time.process_time() - cpu, out[0, ids.shape[1]:].tolist()

    run(4)  # warm-up
    ttft = min(run(1) for _ in range(3))
    seconds, cpu_seconds, generated = min(run(new_tokens) for _ in range(2))
    return dict(tokens_per_s=new_tokens / seconds, tokens_per_cpu_s=new_tokens / cpu_seconds, ttft_s=ttft[0],
                prompt_tokens=ids.shape[1], new_tokens=new_tokens, peak_memory_mb=peak_memory_mb(),
                loadavg=os.getloadavg(), generated=generated)


def answer_nll(model, tokenizer, examples: int = 8, answer_tokens: int = 48) -> float:
    """Mean NLL of the first answers of data/validation.jsonl, each answer token predicted by a decode step (one
    position, KV cache), the path a generated token takes: int8 decoding shows here where it is on."""
    from medassist.data import read_records, tokenize_example

    total, count = 0.0, 0
    for record in read_records(ROOT / "data" / "validation.jsonl")[:examples]:
        row = tokenize_example(tokenizer, record, 384)
        start = next(i for i, label in enumerate(row["labels"]) if label != IGNORE_INDEX)
        ids = row["input_ids"][:start + answer_tokens]
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids[:start]], device=model.device), use_cache=True, logits_to_keep=1)
            logits = [out.logits[0, -1]]
            for token in ids[start:-1]:  # each answer token but the last is fed back to predict the next
                out = model(input_ids=torch.tensor([[token]], device=model.device), cache=out.past_key_values,
                            use_cache=True)
                logits.append(out.logits[0, -1])
        targets = torch.tensor(ids[start:], device=model.device)
        total += torch.nn.functional.cross_entropy(torch.stack(logits).float(), targets, reduction="sum").item()
        count += len(targets)
    return total / count


def _ours(args, decode_weights: str, how: str) -> dict:
    from medassist.generate import load_for_generation

    model, tokenizer, _ = load_for_generation(str(Path(args.workdir) / "lora_adapter"), args.model, args.precision,
                                              decode_weights=decode_weights)
    return time_generation(model, tokenizer, args.new_tokens) | dict(answer_nll=answer_nll(model, tokenizer), how=how)


def generate_medassist(args) -> dict:
    return _ours(args, "int8", "medassist.generate.load_for_generation: base unquantized, LoRA merged, contiguous "
                               "head input, int8 decode weights on CPU")


def generate_dense(args) -> dict:
    return _ours(args, "dense", "load_for_generation(decode_weights='dense')")


def _peft_model(args, quantization: str):
    from peft import PeftModel

    from medassist.loading import load_model

    base = load_model(args.model, quantization, args.precision, device=device())
    return PeftModel.from_pretrained(base, str(Path(args.workdir) / "lora_adapter"))


def generate_merged(args) -> dict:
    """The honest peer: what peft's docs say to do for inference, in the same compute dtype, plain HF generate."""
    from medassist.loading import load_tokenizer

    model, tokenizer = _peft_model(args, "none").merge_and_unload().eval(), load_tokenizer(args.model)
    model.config.use_cache = True
    return time_generation(model, tokenizer, args.new_tokens) | dict(
        answer_nll=answer_nll(model, tokenizer), how="PeftModel.merge_and_unload, base unquantized, plain generate")


def generate_seed(args) -> dict:
    from medassist.loading import load_tokenizer

    model = _peft_model(args, args.quant).eval()
    return time_generation(model, load_tokenizer(args.model), args.new_tokens) | dict(
        how=f"PeftModel.generate, {args.quant} base, adapter unmerged")


TRAIN = {"medassist": train_medassist, "tuned": train_tuned, "trl": train_trl, "seed": train_seed}
GENERATE = {"medassist": generate_medassist, "dense": generate_dense, "merged": generate_merged, "seed": generate_seed}
