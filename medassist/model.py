"""The LightningModule: a quantized Gemma with peft LoRA, answer-only loss, perplexity, optimizer, adapter saving.

Lightning owns the loop, devices, accumulation, clipping and checkpoint files; this file owns what is specific to
fine-tuning an adapter: which weights train, how the loss is weighted, and what a checkpoint keeps. The loss kernel
is in loss.py, the callbacks and the checkpoint writer in callbacks.py, the FSDP wrap policy in strategies.py.
"""

import json
import logging
import math
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torchmetrics import MeanMetric

from medassist import UserError
from medassist.budget import CosineToFloor, TimeBudget
from medassist.callbacks import AdapterCheckpoint, CheckpointOnSigterm, ProgressLines, describe
from medassist.data import IGNORE_INDEX
from medassist.files import ADAPTER_META, atomic_dir
from medassist.generate import answer_batch
from medassist.sampling import Sampling
from medassist.loading import (LoraInit, Precision, Quantization, add_neftune, check_lora_init, check_target_modules,
                               load_model, lora_config, pissa_as_lora, pissa_start)
from medassist.loss import chunked_cross_entropy
from medassist.prompts import TEMPLATE_NAME, check_template

log = logging.getLogger(__name__)

MIB = 2**20


class MedAssistLM(L.LightningModule):
    """Gemma + LoRA fine-tuned on answer tokens only.

    Args:
        base_model: 'embedded' (offline gemma-3-270m), a local directory, a .gguf file or a hub id (google/gemma-2b).
        quantization: how the frozen base is stored: 'int8' (bitsandbytes LLM.int8), 'nf4' (QLoRA) or 'none'.
        precision: compute dtype of the base: 'auto' (bf16 where the CPU/GPU has native bf16, else fp32), 'bf16', 'fp32'.
        attn_implementation: 'sdpa' or 'eager' (measured in BENCHMARKS.md).
        lora_r, lora_alpha, lora_dropout: LoRA rank, scale numerator and dropout.
        target_modules: 'all-linear' or a list of module names (q_proj, v_proj, ...). Never lm_head/embed_tokens:
            Gemma ties them, and a merged adapter would lose the trained head.
        use_dora: DoRA: a trained magnitude per output row beside the LoRA direction (peft; a little slower).
        use_rslora: rank-stabilised LoRA: scale lora_alpha / sqrt(lora_r) instead of lora_alpha / lora_r.
        init_lora_weights: true (B = 0, peft's default), 'gaussian', or 'pissa' / 'pissa_niter_<n>' (quantization none).
        neftune_noise_alpha: NEFTune: uniform noise of alpha / sqrt(length x hidden) on the embeddings, training only.
        learning_rate, weight_decay: AdamW settings for the adapter weights.
        warmup_steps: linear warm-up in optimizer steps, then cosine decay to min_lr_ratio x learning_rate.
        gradient_checkpointing: recompute activations in backward (less memory, ~30% slower).
        loss_chunk_mib: memory of the fp32 logits the loss holds at once, in MiB; the loss peaks at about twice
            this, whatever the batch (32 = 1,024 tokens x 8,192 vocabulary entries at a time).
        loss_chunk_size: deprecated, the old name: loss_chunk_size x vocabulary fp32 logits at once.
        sampling: decoding settings for `predict` (max_new_tokens, temperature, top_p, repetition_penalty, seed).
    """

    def __init__(
        self,
        base_model: str = "embedded",
        quantization: Quantization = "int8",
        precision: Precision = "auto",
        attn_implementation: str = "sdpa",
        lora_r: int = 16,
        lora_alpha: int = 32,
        lora_dropout: float = 0.05,
        target_modules: str | list[str] = "all-linear",
        use_dora: bool = False,
        use_rslora: bool = False,
        init_lora_weights: LoraInit = True,
        neftune_noise_alpha: float | None = None,
        learning_rate: float = 2e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 10,
        min_lr_ratio: float = 0.1,
        gradient_checkpointing: bool = False,
        loss_chunk_mib: float = 32.0,
        loss_chunk_size: int | None = None,
        sampling: Sampling | None = None,
    ):
        super().__init__()
        check_target_modules(target_modules)
        check_lora_init(init_lora_weights, quantization, use_dora)
        if neftune_noise_alpha is not None and neftune_noise_alpha <= 0:
            raise UserError(f"neftune_noise_alpha must be positive (the paper uses 5 to 15) or null, got "
                            f"{neftune_noise_alpha}")
        if loss_chunk_mib <= 0:
            raise UserError(f"loss_chunk_mib must be positive, got {loss_chunk_mib}")
        if loss_chunk_size is not None:
            rank_zero_warn(f"model.loss_chunk_size is deprecated: it held loss_chunk_size x vocabulary fp32 logits at "
                           f"once; say the memory instead, e.g. loss_chunk_mib: {loss_chunk_size * 262144 * 4 / MIB:g} "
                           f"for Gemma-3's 262k vocabulary")
        self.save_hyperparameters()
        self.sampling = Sampling(**sampling) if isinstance(sampling, dict) else sampling or Sampling()
        self.model = None  # built in configure_model, on each process's own device
        self._pissa_start = None  # a PiSSA adapter's initial weights (configure_model)
        self.strict_loading = False  # checkpoints hold the adapter only; the frozen base comes from base_model
        self.val_nll, self.test_nll = MeanMetric(), MeanMetric()
        # The same answers split by turn: first answers (single questions, a conversation's first turn) and follow-ups.
        self.val_turns = torch.nn.ModuleDict({"single": MeanMetric(), "followup": MeanMetric()})
        self.base_ppl = None  # validation perplexity before training (the sanity check runs the whole val set)
        self.base_turns = {}  # the same for first answers and follow-ups
        self._step_start, self._window_tokens = None, 0

    # ---- model -------------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        from peft import get_peft_model

        hp = self.hparams
        device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        base = load_model(hp.base_model, hp.quantization, hp.precision, hp.attn_implementation, device)
        if hp.gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            base.enable_input_require_grads()
        self.model = get_peft_model(base, lora_config(
            hp.lora_r, hp.lora_alpha, hp.lora_dropout, hp.target_modules, use_dora=hp.use_dora,
            use_rslora=hp.use_rslora, init_lora_weights=hp.init_lora_weights))
        self._pissa_start = pissa_start(self.model, hp.init_lora_weights)  # to save the plain LoRA difference
        add_neftune(base, hp.neftune_noise_alpha)
        self.model.train()  # from_pretrained returns eval mode, and Lightning >= 2.2 keeps each module's mode

    def response_nll(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of NLL over supervised tokens, number of supervised tokens); logits only where labels exist."""
        return next(self.response_nlls(batch, [None]))

    def response_nlls(self, batch, masks: list):
        """(NLL sum, tokens) for each mask (shaped as the labels) narrowing the supervised positions (None: all of
        them), one decoder pass for all: validation splits first answers from follow-ups with it."""
        inner = self.model.get_base_model()
        hidden = inner.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
        labels = batch["labels"][:, 1:]  # the one shift: position t predicts token t+1
        weight = inner.get_output_embeddings().weight
        softcap = getattr(inner.config, "final_logit_softcapping", None)
        for mask in masks:
            keep = (labels != IGNORE_INDEX) & (True if mask is None else mask[:, 1:].bool())
            yield chunked_cross_entropy(hidden[:, :-1][keep], weight, labels[keep], self._chunk_bytes(len(weight)),
                                        softcap), keep.sum()

    def _chunk_bytes(self, vocab: int) -> int:
        hp = self.hparams
        if hp.get("loss_chunk_size") is not None:  # the old knob counted rows of the full vocabulary
            return hp.loss_chunk_size * vocab * 4
        return int(hp.loss_chunk_mib * MIB)

    # ---- training ----------------------------------------------------------------------------------------------
    def on_train_start(self):
        self._window_tokens = 0

    def on_train_batch_start(self, batch, batch_idx):
        self._step_start = time.perf_counter()

    def training_step(self, batch, batch_idx):
        nll, n = self.response_nll(batch)
        if n == 0:
            raise UserError(f"training batch {batch_idx} has no answer tokens; check max_seq_length and the data")
        # The mean over ranks is what is logged, and a NaN on any rank makes it NaN on all, so every rank stops at
        # this step (one rank raising alone would leave the others waiting in the gradient all-reduce).
        mean = nll.detach() / n
        mean = self.trainer.strategy.reduce(mean.clone(), reduce_op="mean") if self._trainer else mean
        if not torch.isfinite(mean):
            raise FloatingPointError(
                f"training loss is {mean.item()} at step {self.global_step} (batch {batch_idx}); stopping. The last "
                f"good checkpoint and adapter are kept. Lower learning_rate or use precision: fp32.")
        self.log("train/loss", mean, prog_bar=True)
        self._batch_tokens = (int(batch["attention_mask"].sum()), int(n))
        self._window_tokens += int(n)
        return nll / self._loss_scale()

    def _loss_scale(self) -> float:
        """What backward divides each micro-batch's NLL sum by: the expected supervised tokens of a micro-batch (a
        constant, so gradients keep a per-token magnitude); on_before_optimizer_step replaces it by the exact count."""
        datamodule = self.trainer.datamodule if self._trainer else None
        return getattr(datamodule, "tokens_per_batch", None) or 1.0

    def on_before_optimizer_step(self, optimizer):
        """Every supervised token of the optimizer step weighs the same, across micro-batches and ranks (DESIGN.md):
        the gradient becomes sum of token NLL gradients / N, N the supervised tokens of the whole accumulation
        window on all ranks, before Lightning clips it. DeepSpeed owns its gradients (clipped inside its step), so
        there the constant scale stays: its gradient is the per-token mean x (tokens in the step / expected)."""
        tokens, self._window_tokens = self._window_tokens, 0
        trainer = self.trainer
        if not tokens or isinstance(trainer.strategy, DeepSpeedStrategy):
            return
        total = trainer.strategy.reduce(torch.tensor(float(tokens), device=self.device), reduce_op="sum")
        # Lightning divided each micro-batch's loss by accumulate_grad_batches, and DDP/FSDP average over ranks.
        scale = self._loss_scale() * trainer.accumulate_grad_batches * trainer.world_size / float(total)
        for p in self.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        seconds = time.perf_counter() - self._step_start
        tokens, supervised = self._batch_tokens
        self.log_dict({"train/tokens_per_s": tokens / seconds, "train/response_tokens_per_s": supervised / seconds})

    # ---- validation and test: perplexity of the answer tokens ----------------------------------------------------
    def on_validation_model_eval(self) -> None:
        super().on_validation_model_eval()
        self._int8_fast_path()

    def on_test_model_eval(self) -> None:
        super().on_test_model_eval()
        self._int8_fast_path()

    def on_predict_model_eval(self) -> None:
        super().on_predict_model_eval()
        self._int8_fast_path()

    def _int8_fast_path(self) -> None:
        # bitsandbytes' int8 inference path quantizes activations through fp16 on the CPU (slow everywhere, ~100x on
        # AVX2); its training path dequantizes and multiplies in our dtype. Only these layers stay in "train" mode:
        # they have no dropout, so the result is the same.
        if self.device.type == "cpu" and self.hparams.quantization == "int8":
            from bitsandbytes.nn import Linear8bitLt

            for module in self.modules():
                if isinstance(module, Linear8bitLt):
                    module.training = True  # this module only, not its children

    def validation_step(self, batch, batch_idx):
        follow = batch["followup"].bool()
        masks = {"single": ~follow, "followup": follow}
        for (name, mask), (nll, n) in zip(masks.items(), self.response_nlls(batch, list(masks.values()))):
            self.val_turns[name].update(nll / n.clamp(min=1), weight=n)
            self.val_nll.update(nll / n.clamp(min=1), weight=n)  # token-weighted over both: the mean of every answer

    def test_step(self, batch, batch_idx):
        self._update_nll(self.test_nll, batch)

    def _update_nll(self, metric: MeanMetric, batch) -> None:
        nll, n = self.response_nll(batch)
        metric.update(nll / n.clamp(min=1), weight=n)  # token-weighted: the mean NLL of every answer token

    def _perplexity(self, metric: MeanMetric) -> tuple[torch.Tensor, torch.Tensor]:
        loss = metric.compute()  # synced across ranks
        metric.reset()
        return loss, loss.exp()

    def _turn_perplexities(self) -> dict[str, float]:
        """val/ppl of first answers and of follow-ups, for the kinds the validation set has."""
        out = {}
        for name, metric in self.val_turns.items():
            ppl = self._perplexity(metric)[1]  # computed on every rank (a sync), NaN where no rank saw such a turn
            if torch.isfinite(ppl):
                out[f"val/ppl_{name}"] = ppl
        return out

    def on_validation_epoch_end(self):
        loss, ppl = self._perplexity(self.val_nll)
        turns = self._turn_perplexities()
        if self.trainer.sanity_checking:
            if self.base_ppl is None and self.global_step == 0:
                self.base_ppl = ppl.item()
                self.base_turns = {k: v.item() for k, v in turns.items()}
                rank_zero_info(f"validation perplexity before training: {self.base_ppl:.3f}{describe(self.base_turns)}")
            return
        self.log_dict({"val/loss": loss, "val/ppl": ppl, **turns}, prog_bar=True)

    def on_test_epoch_end(self):
        loss, ppl = self._perplexity(self.test_nll)
        self.log_dict({"test/loss": loss, "test/ppl": ppl})

    # ---- prediction ----------------------------------------------------------------------------------------------
    def predict_step(self, batch: list[dict], batch_idx: int) -> list[dict]:
        """Answer records for a batch of {"question"} items (bad lines pass through with their "error")."""
        tokenizer = self.trainer.datamodule.tokenizer
        good = [item for item in batch if "error" not in item]
        adapter = self.trainer.ckpt_path
        index = getattr(self.trainer.datamodule, "retriever", None)  # data.index: answer from it, as ask --index
        answers = iter(answer_batch(self.model, tokenizer, [item["question"] for item in good], self.sampling,
                                    self.hparams.base_model, adapter and str(adapter), [i.get("id") for i in good],
                                    index))
        return [{"question": None, "error": item["error"]} if "error" in item else next(answers) for item in batch]

    # ---- optimizer ---------------------------------------------------------------------------------------------
    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay)
        # Its length is set at the start of training (budget.TimeBudget.on_train_start: the configured steps, planned
        # down to trainer.max_time's): the first factor does not depend on it, and counting steps here would make
        # Lightning set up the train loader too early, so a resumed run would restart its epoch (Lightning #20550).
        schedule = CosineToFloor(self.hparams.warmup_steps, math.inf, self.hparams.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- checkpoints -------------------------------------------------------------------------------------------
    def configure_callbacks(self):
        return [AdapterCheckpoint(), CheckpointOnSigterm(), TimeBudget(), ProgressLines()]

    def on_save_checkpoint(self, checkpoint):
        # Only the adapter: with the frozen base a gemma-3-270m int8 checkpoint is 740 MB, and the base is rebuilt
        # from base_model anyway. FSDP's wrapper modules show in parameter names, not in state-dict keys.
        trainable = {n.replace("_fsdp_wrapped_module.", "") for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["medassist"] = {"template": TEMPLATE_NAME, "base_ppl": self.base_ppl, "base_turns": self.base_turns,
                                   **self._data_layout()}

    def _data_layout(self) -> dict:
        """What the saved loader position is counted in: batches of this size on this many ranks, grouped in
        optimizer steps of this many micro-batches (the sampler's order depends on all three)."""
        if self._trainer is None:
            return {}
        datamodule = getattr(self.trainer, "datamodule", None)
        return {"world_size": self.trainer.world_size, "batch_size": getattr(datamodule, "batch_size", None),
                "accumulate_grad_batches": self.trainer.accumulate_grad_batches}

    def on_load_checkpoint(self, checkpoint):
        if self._trainer is not None:  # say which state a resumed run continues from
            rank_zero_info(f"restoring {self.trainer.ckpt_path}: step {checkpoint['global_step']}, "
                           f"epoch {checkpoint['epoch']}")
        meta = checkpoint.get("medassist", {})
        self.base_ppl, self.base_turns = meta.get("base_ppl"), meta.get("base_turns", {})
        check_template(meta.get("template"), "checkpoint", "Resume with the matching medassist version")
        if self._trainer is not None and "world_size" in meta:
            self._warn_on_layout_change(meta)

    def _warn_on_layout_change(self, meta: dict) -> None:
        now = self._data_layout()
        saved = {**now, **{k: meta[k] for k in now if k in meta}}  # older checkpoints lack accumulate_grad_batches
        if saved == now:
            return
        accumulation = ""
        if saved["accumulate_grad_batches"] != now["accumulate_grad_batches"]:
            accumulation = (f", accumulating {saved['accumulate_grad_batches']} batches per optimizer step where this "
                            f"run accumulates {now['accumulate_grad_batches']}")
        rank_zero_warn(f"{self.trainer.ckpt_path} was written with {saved['world_size']} device(s) x batch "
                       f"{saved['batch_size']}; this run has {now['world_size']} x {now['batch_size']}{accumulation}. "
                       f"The adapter and optimizer state are restored, but the position in the current epoch counts "
                       f"batches of the old layout, so some of its examples will be repeated or skipped. Resume with "
                       f"the same devices, batch size and accumulation for an exact continuation.")

    def save_adapter(self, directory: str | Path, state_dict: dict | None = None, **extra) -> Path:
        """Write the adapter in peft format (plus medassist.json) atomically: a kill never leaves half a directory,
        and a failed save leaves neither a changed adapter nor a temporary directory.

        state_dict: this module's weights as the strategy gathered them (FSDP shards the live ones); default: live.
        """
        if state_dict is not None:
            state_dict = {k.removeprefix("model."): v for k, v in state_dict.items() if k.startswith("model.")}
        hp = self.hparams
        meta = {"template": TEMPLATE_NAME, "base_model": hp.base_model, "quantization": hp.quantization,
                "precision": hp.precision, "step": self.global_step, **extra}
        with atomic_dir(directory) as tmp, pissa_as_lora(self._pissa_start) as conversion:
            self.model.save_pretrained(tmp, state_dict=state_dict, **conversion)
            (tmp / ADAPTER_META).write_text(json.dumps(meta, indent=2))
        return Path(directory)
