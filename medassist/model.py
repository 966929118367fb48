"""The LightningModule: a quantized Gemma with peft LoRA, answer-only loss, perplexity, optimizer, adapter saving.

Lightning owns the loop, devices, accumulation, clipping and checkpoint files; this file owns what is specific to
fine-tuning an adapter: which weights train, how the loss is computed, and what a checkpoint keeps.
"""

import json
import logging
import math
import os
import signal
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torchmetrics import MeanMetric

from medassist import UserError
from medassist.files import ADAPTER_META, replace_dir
from medassist.data import IGNORE_INDEX
from medassist.generate import Sampling, answer_batch
from medassist.loading import Precision, Quantization, load_model
from medassist.prompts import TEMPLATE_NAME

log = logging.getLogger(__name__)


def chunked_cross_entropy(hidden, weight, targets, chunk_size: int = 32, softcap: float | None = None):
    """Sum of token NLLs of `targets` under logits `hidden @ weight.T`, holding chunk_size x V logits at a time.

    hidden: (N, d) states at supervised positions only; weight: (V, d) frozen output embedding; targets: (N,).
    They are laid out as (chunk_size x V / 8192 tokens) x (8192 vocabulary entries): wide matmuls over many tokens
    make the loss ~2.5x faster on a CPU than 32 tokens x the whole vocabulary (BENCHMARKS.md). Log-sum-exps are
    merged across vocabulary blocks online, in fp32, and the gradient with respect to `hidden`, softmax @ W - W[y],
    is accumulated in the same pass, so backward costs nothing. Peak memory: 2 x chunk_size x V fp32 numbers
    (67 MB for V = 262k and chunk_size 32), whatever N.
    """
    if weight.requires_grad:
        raise UserError("the output embedding must stay frozen (do not train lm_head/embed_tokens)")
    return _ChunkedCrossEntropy.apply(hidden, weight, targets, chunk_size, softcap)


class _ChunkedCrossEntropy(torch.autograd.Function):
    VOCAB_BLOCK = 8192  # vocabulary entries per block (of 4096-32768, measured fastest; BENCHMARKS.md)

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, softcap):
        grad = ctx.needs_input_grad[0]
        block = min(len(weight), _ChunkedCrossEntropy.VOCAB_BLOCK)
        tokens = max(1, chunk_size * len(weight) // block)  # chunk_size x V logits at once, as tokens x block
        total, grads = torch.zeros((), dtype=torch.float32, device=hidden.device), []
        for h, y in zip(hidden.split(tokens), targets.split(tokens)):
            lse = torch.full((len(h), 1), -math.inf, device=h.device)  # log-sum-exp of the blocks so far
            acc = torch.zeros(h.shape, device=h.device)  # softmax @ W of the blocks so far
            for w in weight.split(block):
                block_lse, block_grad = _ChunkedCrossEntropy._block(h, w, softcap, grad)
                merged = torch.logaddexp(lse, block_lse)
                if grad:
                    acc.mul_((lse - merged).exp_()).add_(block_grad.mul_((block_lse - merged).exp_()))
                lse = merged
            w_y = weight[y].float()
            z_y = (h.float() * w_y).sum(-1, keepdim=True)  # the target's logit
            if softcap:
                capped = torch.tanh(z_y / softcap)
                z_y, w_y = capped * softcap, w_y * (1 - capped.square())
            total += (lse - z_y).sum()
            grads.append(acc - w_y)
        if grad:
            ctx.save_for_backward(torch.cat(grads).to(hidden.dtype) if grads else torch.zeros_like(hidden))
        return total

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
        learning_rate, weight_decay: AdamW settings for the adapter weights.
        warmup_steps: linear warm-up in optimizer steps, then cosine decay to min_lr_ratio x learning_rate.
        gradient_checkpointing: recompute activations in backward (less memory, ~30% slower).
        loss_chunk_size: supervised tokens per chunk of logits in the loss (memory = chunk x vocabulary floats).
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
        learning_rate: float = 2e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 10,
        min_lr_ratio: float = 0.1,
        gradient_checkpointing: bool = False,
        loss_chunk_size: int = 32,
        sampling: Sampling | None = None,
    ):
        super().__init__()
        bad = {"lm_head", "embed_tokens"} & set([target_modules] if isinstance(target_modules, str) else target_modules)
        if bad:
            raise UserError(f"target_modules must not include {sorted(bad)}: Gemma ties them (see LESSONS 12)")
        self.save_hyperparameters()
        self.sampling = Sampling(**sampling) if isinstance(sampling, dict) else sampling or Sampling()
        self.model = None  # built in configure_model, on each process's own device
        self.strict_loading = False  # checkpoints hold the adapter only; the frozen base comes from base_model
        self.val_nll = MeanMetric()
        self.base_ppl = None  # validation perplexity before training (the sanity check runs the whole val set)
        self._step_start = None

    # ---- model -------------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        from peft import LoraConfig, get_peft_model

        hp = self.hparams
        device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        base = load_model(hp.base_model, hp.quantization, hp.precision, hp.attn_implementation, device)
        if hp.gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            base.enable_input_require_grads()
        config = LoraConfig(r=hp.lora_r, lora_alpha=hp.lora_alpha, lora_dropout=hp.lora_dropout,
                            target_modules=hp.target_modules, task_type="CAUSAL_LM")
        self.model = get_peft_model(base, config)
        self.model.train()  # from_pretrained returns eval mode, and Lightning >= 2.2 keeps each module's mode

    def response_nll(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of NLL over supervised tokens, number of supervised tokens); logits only where labels exist."""
        inner = self.model.get_base_model()
        hidden = inner.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
        labels = batch["labels"][:, 1:]  # the one shift: position t predicts token t+1
        keep = labels != IGNORE_INDEX
        softcap = getattr(inner.config, "final_logit_softcapping", None)
        nll = chunked_cross_entropy(hidden[:, :-1][keep], inner.get_output_embeddings().weight, labels[keep],
                                    self.hparams.loss_chunk_size, softcap)
        return nll, keep.sum()

    # ---- training ----------------------------------------------------------------------------------------------
    def on_train_batch_start(self, batch, batch_idx):
        self._step_start = time.perf_counter()

    def training_step(self, batch, batch_idx):
        nll, n = self.response_nll(batch)
        if n == 0:
            raise UserError(f"training batch {batch_idx} has no answer tokens; check max_seq_length and the data")
        loss = nll / n
        # The mean over ranks is what is logged, and a NaN on any rank makes it NaN on all, so every rank stops at
        # this step (one rank raising alone would leave the others waiting in the gradient all-reduce).
        mean = self.trainer.strategy.reduce(loss.detach().clone(), reduce_op="mean") if self._trainer else loss
        if not torch.isfinite(mean):
            raise FloatingPointError(
                f"training loss is {mean.item()} at step {self.global_step} (batch {batch_idx}); stopping. The last "
                f"good checkpoint and adapter are kept. Lower learning_rate or use precision: fp32.")
        self.log("train/loss", mean, prog_bar=True)
        self._batch_tokens = (int(batch["attention_mask"].sum()), int(n))
        # Every supervised token weighs the same across micro-batches and ranks: divide by a constant (DESIGN.md)
        tokens_per_batch = getattr(self.trainer.datamodule, "tokens_per_batch", None) if self._trainer else None
        return nll / (tokens_per_batch or n)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        seconds = time.perf_counter() - self._step_start
        tokens, supervised = self._batch_tokens
        self.log_dict({"train/tokens_per_s": tokens / seconds, "train/response_tokens_per_s": supervised / seconds})

    # ---- validation ----------------------------------------------------------------------------------------------
    def on_validation_model_eval(self) -> None:
        super().on_validation_model_eval()
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
        nll, n = self.response_nll(batch)
        self.val_nll.update(nll / n.clamp(min=1), weight=n)

    def on_validation_epoch_end(self):
        loss = self.val_nll.compute()
        self.val_nll.reset()
        ppl = loss.exp()
        if self.trainer.sanity_checking:
            if self.base_ppl is None and self.global_step == 0:
                self.base_ppl = ppl.item()
                rank_zero_info(f"validation perplexity before training: {self.base_ppl:.3f}")
            return
        self.log_dict({"val/loss": loss, "val/ppl": ppl}, prog_bar=True)

    # ---- prediction ----------------------------------------------------------------------------------------------
    def predict_step(self, batch: list[dict], batch_idx: int) -> list[dict]:
        """Answer records for a batch of {"question"} items (bad lines pass through with their "error")."""
        tokenizer = self.trainer.datamodule.tokenizer
        questions = [item["question"] for item in batch if "error" not in item]
        adapter = self.trainer.ckpt_path
        answers = iter(answer_batch(self.model, tokenizer, questions, self.sampling,
                                    self.hparams.base_model, adapter and str(adapter)))
        return [{"question": None, "error": item["error"]} if "error" in item else next(answers) for item in batch]

    # ---- optimizer ---------------------------------------------------------------------------------------------
    def configure_optimizers(self):
        from transformers import get_cosine_with_min_lr_schedule_with_warmup

        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay)
        scheduler = get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, num_warmup_steps=self.hparams.warmup_steps,
            num_training_steps=max(1, self._optimizer_steps()), min_lr_rate=self.hparams.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _optimizer_steps(self) -> int:
        """trainer.estimated_stepping_batches, without letting it set up the fit loop's train loader: set up this early,
        a resumed run never restores the loader's position and silently restarts the epoch (Lightning #20550)."""
        trainer = self.trainer
        if trainer.datamodule is None or trainer.max_epochs == -1 or trainer.limit_train_batches != 1.0:
            return trainer.estimated_stepping_batches
        loader = trainer.datamodule.train_dataloader()  # a throwaway loader, only counted
        steps = math.ceil(len(loader) / trainer.accumulate_grad_batches) * max(trainer.max_epochs, 1)
        return min(steps, trainer.max_steps) if trainer.max_steps != -1 else steps

    # ---- checkpoints -------------------------------------------------------------------------------------------
    def configure_callbacks(self):
        return [AdapterCheckpoint(), CheckpointOnSigterm()]

    def on_save_checkpoint(self, checkpoint):
        # Only the adapter: the frozen base is megabytes x 100 and is rebuilt from base_model (LESSONS 10).
        # FSDP's wrapper modules show in parameter names, not in state-dict keys
        trainable = {n.replace("_fsdp_wrapped_module.", "") for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["medassist"] = {"template": TEMPLATE_NAME, "base_ppl": self.base_ppl, **self._data_layout()}

    def _data_layout(self) -> dict:
        """What the saved loader position is counted in: batches of this size on this many ranks."""
        if self._trainer is None:
            return {}
        datamodule = getattr(self.trainer, "datamodule", None)
        return {"world_size": self.trainer.world_size, "batch_size": getattr(datamodule, "batch_size", None)}

    def on_load_checkpoint(self, checkpoint):
        if self._trainer is not None:  # say which state a resumed run continues from
            rank_zero_info(f"restoring {self.trainer.ckpt_path}: step {checkpoint['global_step']}, "
                           f"epoch {checkpoint['epoch']}")
        meta = checkpoint.get("medassist", {})
        self.base_ppl = meta.get("base_ppl")
        if meta.get("template", TEMPLATE_NAME) != TEMPLATE_NAME:
            raise UserError(f"checkpoint was trained with prompt template {meta['template']!r}, "
                            f"this code uses {TEMPLATE_NAME!r}; resume with the matching medassist version")
        if self._trainer is not None and "world_size" in meta:
            saved, now = (meta["world_size"], meta["batch_size"]), tuple(self._data_layout().values())
            if saved != now:
                rank_zero_warn(f"{self.trainer.ckpt_path} was written with {saved[0]} device(s) x batch {saved[1]}; "
                               f"this run has {now[0]} x {now[1]}. The adapter and optimizer state are restored, but "
                               f"the position in the current epoch counts batches of the old layout, so some of its "
                               f"examples will be repeated or skipped. Resume with the same devices and batch size "
                               f"for an exact continuation.")

    def save_adapter(self, directory: str | Path, state_dict: dict | None = None, **extra) -> Path:
        """Write the adapter in peft format (plus medassist.json) atomically: a kill never leaves half a directory.

        state_dict: this module's weights as the strategy gathered them (FSDP shards the live ones); default: live.
        """
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
        if state_dict is not None:
            state_dict = {k.removeprefix("model."): v for k, v in state_dict.items() if k.startswith("model.")}
        self.model.save_pretrained(tmp, state_dict=state_dict)
        hp = self.hparams
        meta = {"template": TEMPLATE_NAME, "base_model": hp.base_model, "quantization": hp.quantization,
                "precision": hp.precision, "step": self.global_step, **extra}
        (tmp / ADAPTER_META).write_text(json.dumps(meta, indent=2))
        replace_dir(tmp, directory)
        return directory


class AdapterCheckpoint(L.Callback):
    """Saves the adapter to <run>/lora_adapter at the end of fit and to <run>/lora_adapter_best when val/ppl improves.

    Nothing is written after a crash or a NaN: the last good adapters stay where they were.
    """

    def __init__(self, monitor: str = "val/ppl"):
        self.monitor, self.best, self.validated_at = monitor, math.inf, None

    def on_validation_end(self, trainer, pl_module):
        value = trainer.callback_metrics.get(self.monitor)
        if not trainer.sanity_checking and value is not None:
            self.validated_at = trainer.global_step
        if trainer.sanity_checking or value is None or not value < self.best:
            return
        self.best = float(value)
        self._save(trainer, pl_module, "lora_adapter_best", val_ppl=self.best)

    def on_fit_end(self, trainer, pl_module):
        ppl = trainer.callback_metrics.get(self.monitor)
        path = self._save(trainer, pl_module, "lora_adapter", val_ppl=None if ppl is None else float(ppl))
        base = "n/a" if pl_module.base_ppl is None else f"{pl_module.base_ppl:.3f}"
        final = "n/a" if ppl is None else f"{float(ppl):.3f}"
        if ppl is not None and self.validated_at not in (None, trainer.global_step):  # e.g. stopped by max_time
            final += f" (measured at step {self.validated_at}; the adapter is from step {trainer.global_step})"
        rank_zero_info(f"validation perplexity: base {base} -> fine-tuned {final}; adapter saved to {path}")

    @staticmethod
    def _save(trainer, pl_module, name: str, **extra) -> Path | None:
        # Every rank must take part: log_dir is a broadcast, and FSDP gathers the state dict from all shards.
        run, state = Path(trainer.log_dir), trainer.strategy.lightning_module_state_dict()
        return pl_module.save_adapter(run / name, state, **extra) if trainer.is_global_zero else None

    def state_dict(self):
        return {"best": self.best, "validated_at": self.validated_at}

    def load_state_dict(self, state_dict):
        self.best, self.validated_at = state_dict["best"], state_dict.get("validated_at")


class CheckpointOnSigterm(L.Callback):
    """On SIGTERM (what schedulers send before killing a job) write last.ckpt, so `fit --ckpt_path last` resumes.

    Every rank must stop at the same point: one that stops alone leaves the others waiting in a collective.
    Lightning's own handler broadcasts from inside the signal handler, where it can meet another collective in flight
    and hang DDP (Lightning #20806; seen here with 2 CPU processes). This handler only notes the signal; after each
    optimizer step and validation batch the ranks add up their notes, and all stop together if any was signalled.
    """

    def __init__(self):
        self.installed, self.signalled, self.step = False, False, -1

    def on_train_start(self, trainer, pl_module):
        # Lightning has installed its handlers by now; it puts the original ones back after fit.
        signal.signal(signal.SIGTERM, self._note)
        self.installed = True

    def _note(self, signum, frame):
        self.signalled = True

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self.step:  # an optimizer step, not a micro-batch inside one
            self._stop_if_signalled(trainer, pl_module)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._stop_if_signalled(trainer, pl_module)

    def _stop_if_signalled(self, trainer, pl_module):
        if not self.installed:  # not fitting, or the sanity check before training
            return
        votes = trainer.strategy.reduce(torch.tensor(float(self.signalled), device=pl_module.device), reduce_op="sum")
        if votes > 0:
            raise SIGTERMException  # on every rank at once; on_exception below saves

    def on_exception(self, trainer, pl_module, exception):
        if not isinstance(exception, SIGTERMException):
            return
        for callback in trainer.checkpoint_callbacks:
            if callback.save_last and callback.dirpath:
                path = Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
                trainer.save_checkpoint(path)
                rank_zero_info(f"SIGTERM: saved {path} at step {trainer.global_step}")
                return


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint beside its final name, syncs it to disk, then renames: a kill mid-save keeps the old file.

    Lightning's own save stages the file in $TMPDIR and moves it into place; when that is another filesystem (a tmpfs
    /tmp, a network checkpoint directory) the move is a copy onto the final name, which a kill leaves half-written.
    """

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        if "://" in str(path):  # remote storage: fsspec's transaction is the atomic step there
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def fsdp_wrap_policy(module: torch.nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
    """FSDP units for configs/fsdp.yaml: every decoder layer, and every trainable LoRA weight in a unit of its own.

    FSDP flattens each unit into one tensor of one dtype; the adapters are fp32 beside a bf16 (or nf4 stored as bf16)
    base, so they cannot share their layer's unit. peft's fsdp_auto_wrap_policy makes the same split.
    """
    if recurse:
        return True
    weight = getattr(module, "weight", None)
    trainable_leaf = not any(module.children()) and isinstance(weight, torch.nn.Parameter) and weight.requires_grad
    return trainable_leaf or type(module).__name__.endswith("DecoderLayer")
