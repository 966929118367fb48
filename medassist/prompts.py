"""The prompt template: the one place where a question or a conversation becomes model input, and where its name
comes from.

Training, validation, prediction, serving, evaluation and export all call `format_conversation` /
`encode_turns` (a single question is a one-turn conversation: `format_prompt` / `encode_prompt`); the template's name
(`TEMPLATE_NAME`) is saved beside every adapter and export, and `check_template` refuses a model trained on another
template. No torch, no Lightning: both sides import it.
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
TURN_GAP = "\n"  # between a model turn's <end_of_turn> and the next user turn, as in Gemma's own chat template
# Gemma has no system role: a system message is put before the first user turn's text, as Gemma's chat template does.
SYSTEM_GAP = "\n\n"
INPUT_GAP = "\n\n"  # between a question and its optional input (context) part
# The answer grounded training teaches when the passage does not answer the question (data.grounded_output): say so
# and restate the passage's opening, rather than answer from memory as if it were sourced.
RELATED_ONLY = 'The source I found answers another question ("{title}"), not this one. It says: {opening}'
# Its two sentence openings: claims about a passage, false in an answer given none (the guard drops such sentences).
SOURCE_CLAIMS = (RELATED_ONLY.split(" answers", 1)[0], RELATED_ONLY.split("not this one. ", 1)[1].split(" {", 1)[0])
# Retrieved passages go into the input part, each headed by its title, so the model can restate what it was given.
SOURCE_HEAD = "Source: "
# Generation ends at the end of the model's turn and at any turn marker: a small model that goes on with
# "<start_of_turn>model ..." would otherwise leak a made-up next turn into the answer (plus the tokenizer's eos).
STOP_TOKENS = (END_OF_TURN, START_OF_TURN)


def join_input(instruction: str, input: str = "") -> str:
    """The user turn of an {"instruction", "input"} pair: the question, then its input part after a blank line."""
    question = instruction.strip()
    return f"{question}{INPUT_GAP}{input.strip()}" if input and input.strip() else question


def context_text(passages: list[dict]) -> str:
    """The input part for retrieved passages ({"title", "text"}), best first: "Source: <title>" then its text."""
    return INPUT_GAP.join(f"{SOURCE_HEAD}{p['title'].strip()}\n{p['text'].strip()}" for p in passages)


def fold_system(messages: list[dict]) -> list[dict]:
    """`messages` ({"role", "content"}, already validated) as alternating user/assistant turns, the system message
    (if any, first) put before the first user turn's text."""
    system = [m["content"].strip() for m in messages if m["role"] == "system"]
    turns = [{"role": m["role"], "content": m["content"].strip()} for m in messages if m["role"] != "system"]
    if system and turns:
        turns[0] = {"role": "user", "content": f"{system[0]}{SYSTEM_GAP}{turns[0]['content']}"}
    return turns


def turn_texts(messages: list[dict]) -> list[tuple[str, str]]:
    """(role, text) per turn, whose concatenation is the model's input. A user turn's text carries the markers
    around it and opens the model's turn; an assistant turn's text is its content alone (its <end_of_turn> is added
    as a token by `encode_turns`, so it can be supervised)."""
    out = []
    for i, turn in enumerate(fold_system(messages)):
        if turn["role"] == "user":
            out.append(("user", f"{TURN_GAP if i else ''}{USER}{turn['content']}{PROMPT_TAIL}"))
        else:
            out.append(("assistant", turn["content"]))
    return out


def format_conversation(messages: list[dict]) -> str:
    """The text the model sees before its next answer, for a conversation that ends with a user turn."""
    return "".join(text + (END_OF_TURN if role == "assistant" else "") for role, text in turn_texts(messages))


def format_prompt(instruction: str, input: str = "") -> str:
    """The text the model sees before its answer to one question: one user turn, then the opening of the model's
    turn."""
    return format_conversation([{"role": "user", "content": join_input(instruction, input)}])


_PROBE_CONVERSATION = [{"role": "system", "content": "{system}"}, {"role": "user", "content": "{user}"},
                       {"role": "assistant", "content": "{assistant}"}, {"role": "user", "content": "{follow_up}"}]


def _probes() -> dict[str, list[str]]:
    """The rendered template with placeholders, by what each part covers: one question (with and without an input
    part), a two-turn conversation with a system message, and a question with a retrieved passage."""
    return {"single": [format_prompt("{instruction}"), format_prompt("{instruction}", "{input}")],
            "conversation": [format_conversation(_PROBE_CONVERSATION)],
            "context": [format_prompt("{instruction}", context_text([{"title": "{title}", "text": "{text}"}]))]}


def _digest(parts: tuple[str, ...] = ("single", "conversation", "context")) -> str:
    """A short hash of everything that shapes the model's input: the probes of `parts` and the stop tokens. Any
    change to the strings above changes it."""
    probes = _probes()
    return hashlib.sha256("\x1f".join([*(t for part in parts for t in probes[part]), *STOP_TOKENS]).encode()
                          ).hexdigest()[:8]


# Derived, so a change to the strings cannot forget to rename the template.
TEMPLATE_NAME = f"gemma-turn-{_digest()}"
# Names written by earlier versions, with the parts of the template they covered and the digest those parts had: an
# adapter saved under one of them saw exactly the prompts this code builds for those parts (the later parts only add
# to them), so it loads while their strings are unchanged, and is refused once they change.
EARLIER_NAMES = {"gemma-turn-v1": (("single",), "ef029d2e"), "gemma-turn-ef029d2e": (("single",), "ef029d2e"),
                 "gemma-turn-45311caf": (("single", "conversation"), "45311caf")}


def same_template(name: str | None) -> bool:
    """Whether a saved template name means the template of this code (a missing name is taken as ours)."""
    if name is None or name == TEMPLATE_NAME:
        return True
    parts, digest = EARLIER_NAMES.get(name, ((), None))
    return digest is not None and _digest(parts) == digest


def check_template(name: str | None, source, fix: str) -> None:
    """Refuse `source` (an adapter, an export, a checkpoint) trained on another template; `fix` says what to do."""
    if not same_template(name):
        raise UserError(f"{source} was trained with prompt template {name!r}; this code uses {TEMPLATE_NAME!r}. "
                        f"{fix}")


def encode_text(tokenizer, text: str, bos: bool = False) -> list[int]:
    """Token ids of `text` without the tokenizer's own special tokens; `bos` puts the tokenizer's <bos> first."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [tokenizer.bos_token_id] + ids if bos and tokenizer.bos_token_id is not None else ids


def encode_turns(tokenizer, messages: list[dict]) -> list[tuple[str, list[int]]]:
    """(role, ids) per turn, exactly as training saw them: <bos> first; each assistant turn ends with the
    <end_of_turn> id. Every turn is tokenized on its own, so training and answering split the text the same way."""
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    return [(role, encode_text(tokenizer, text, bos=i == 0) + ([end] if role == "assistant" else []))
            for i, (role, text) in enumerate(turn_texts(messages))]


def encode_conversation(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of the prompt for the next answer in a conversation that ends with a user turn."""
    return [i for _, ids in encode_turns(tokenizer, messages) for i in ids]


def encode_prompt(tokenizer, instruction: str, input: str = "") -> list[int]:
    """Token ids of the prompt for one question, exactly as training saw it: <bos>, then `format_prompt`."""
    return encode_conversation(tokenizer, [{"role": "user", "content": join_input(instruction, input)}])


def prompt_tail_length(tokenizer) -> int:
    """Tokens of `PROMPT_TAIL`: what a truncated prompt keeps at its end."""
    return len(encode_text(tokenizer, PROMPT_TAIL))


def stop_ids(tokenizer) -> list[int]:
    """The ids generation stops at: the tokenizer's eos and `STOP_TOKENS` (those the tokenizer knows)."""
    ids = [tokenizer.eos_token_id] + [tokenizer.convert_tokens_to_ids(t) for t in STOP_TOKENS]
    return sorted({i for i in ids if i is not None and i != tokenizer.unk_token_id})
