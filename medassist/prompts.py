"""The prompt template: the one place where a question becomes model input, and where its name comes from.

Training, validation, prediction, serving, evaluation and export all call `format_prompt` / `encode_prompt`; the
template's name (`TEMPLATE_NAME`) is saved beside every adapter and export, and `check_template` refuses a model
trained on another template. No torch, no Lightning: both sides import it.
"""
import hashlib

from medassist import UserError

# Gemma's chat turn markers. They are single tokens in every Gemma tokenizer (gemma-2b, gemma-3-270m), so the
# pretrained base and the fine-tune agree on where a turn ends.
START_OF_TURN = "<start_of_turn>"
USER = START_OF_TURN + "user\n"
MODEL = START_OF_TURN + "model\n"
END_OF_TURN = "<end_of_turn>"
PROMPT_TAIL = f"{END_OF_TURN}\n{MODEL}"  # closes the question, opens the answer: truncation never cuts it
# Generation ends at the end of the model's turn and at any turn marker: a small model that goes on with
# "<start_of_turn>model ..." would otherwise leak a made-up next turn into the answer (plus the tokenizer's eos).
STOP_TOKENS = (END_OF_TURN, START_OF_TURN)


def format_prompt(instruction: str, input: str = "") -> str:
    """The text the model sees before its answer: one user turn, then the opening of the model's turn."""
    question = instruction.strip()
    if input and input.strip():
        question = f"{question}\n\n{input.strip()}"
    return f"{USER}{question}{PROMPT_TAIL}"


def _digest() -> str:
    """A short hash of everything that shapes the model's input: the rendered template with placeholders, with and
    without an input part, and the stop tokens. Any change to the strings above changes it."""
    probe = "\x1f".join([format_prompt("{instruction}"), format_prompt("{instruction}", "{input}"), *STOP_TOKENS])
    return hashlib.sha256(probe.encode()).hexdigest()[:8]


# Derived, so a change to the strings cannot forget to rename the template.
TEMPLATE_NAME = f"gemma-turn-{_digest()}"
# Names written before the name was derived, with the digest of the strings they stood for: an adapter saved as
# "gemma-turn-v1" is the same template as long as the strings are unchanged, and is refused once they change.
EARLIER_NAMES = {"gemma-turn-v1": "ef029d2e"}


def same_template(name: str | None) -> bool:
    """Whether a saved template name means the template of this code (a missing name is taken as ours)."""
    return name is None or name == TEMPLATE_NAME or EARLIER_NAMES.get(name) == _digest()


def check_template(name: str | None, source, fix: str) -> None:
    """Refuse `source` (an adapter, an export, a checkpoint) trained on another template; `fix` says what to do."""
    if not same_template(name):
        raise UserError(f"{source} was trained with prompt template {name!r}; this code uses {TEMPLATE_NAME!r}. "
                        f"{fix}")


def encode_text(tokenizer, text: str, bos: bool = False) -> list[int]:
    """Token ids of `text` without the tokenizer's own special tokens; `bos` puts the tokenizer's <bos> first."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [tokenizer.bos_token_id] + ids if bos and tokenizer.bos_token_id is not None else ids


def encode_prompt(tokenizer, instruction: str, input: str = "") -> list[int]:
    """Token ids of the prompt, exactly as training saw it: <bos>, then `format_prompt`."""
    return encode_text(tokenizer, format_prompt(instruction, input), bos=True)


def prompt_tail_length(tokenizer) -> int:
    """Tokens of `PROMPT_TAIL`: what a truncated prompt keeps at its end."""
    return len(encode_text(tokenizer, PROMPT_TAIL))


def stop_ids(tokenizer) -> list[int]:
    """The ids generation stops at: the tokenizer's eos and `STOP_TOKENS` (those the tokenizer knows)."""
    ids = [tokenizer.eos_token_id] + [tokenizer.convert_tokens_to_ids(t) for t in STOP_TOKENS]
    return sorted({i for i in ids if i is not None and i != tokenizer.unk_token_id})
