"""Answers: question (or conversation) -> safety screen -> training prompt -> model.generate -> output guard -> record.

One path for every caller (scripts/predict.py, `python -m medassist predict`, the server, the evaluator):
`answer_batch` / `stream_answer` take any causal LM + tokenizer; `Assistant` loads a base (+ adapter) for them.
A question is a text or a conversation ({"role", "content"} turns) that ends with the user's question; the model
sees the whole conversation, oldest exchanges left out first when it does not fit.
With a retrieval index the relevant passage goes into the prompt and its source after the answer.
Every record is a records.AnswerRecord: {"id"?, "conversation"?, "question", "answer", "disclaimer", "flags",
"sources"?, "model", "adapter"}.
No Lightning and no training module: the server imports this.
"""

import json
import logging
import threading
from dataclasses import asdict, dataclass
from itertools import chain
from pathlib import Path
from typing import Iterator

import torch

from medassist import UserError, safety
from medassist.files import ADAPTER_META
from medassist.int8_decode import quantize_for_decoding
from medassist.prompts import SOURCE_CLAIMS, check_template, encode_conversation, stop_ids
from medassist.records import AnswerRecord, answer_record, as_messages, context_of, error_record
from medassist.retrieval import ground
from medassist.sampling import DECODE_WEIGHTS, Sampling  # noqa: F401 (model.py, evaluate.py take Sampling here)

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """How a streamed answer ended: tokens the model generated (0 for a fixed answer), and "length" when
    max_new_tokens cut it, else "stop" (its end of turn, a stop string, or no generation at all)."""

    tokens: int = 0
    finish_reason: str = "stop"


class StopAt:
    """Ends the text at the first of `stops` (OpenAI's `stop`: the stop string itself is not shown). Text that may be
    the start of a stop string is held back until the next piece says whether it is."""

    def __init__(self, stops=()):
        self.stops, self.held, self.hit = [s for s in stops if s], "", False

    def feed(self, piece: str) -> str:
        if self.hit or not self.stops:
            return "" if self.hit else piece
        text = self.held + piece
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if found:
            self.hit, self.held = True, ""
            return text[: min(found)]
        keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - keep:]
        return text[: len(text) - keep]

    def close(self) -> str:
        held, self.held = self.held, ""
        return held


def generate_kwargs(tokenizer, sampling: Sampling) -> dict:
    kwargs = dict(max_new_tokens=sampling.max_new_tokens, repetition_penalty=sampling.repetition_penalty,
                  eos_token_id=stop_ids(tokenizer),
                  pad_token_id=tokenizer.pad_token_id, use_cache=True)
    if sampling.temperature > 0:
        kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kwargs


def prompt_ids(tokenizer, question: str | list[dict], context_length: int, max_new_tokens: int) -> list[int]:
    """The training prompt for `question` (a text, or a conversation that ends with the user's question).

    Too long for the model's context with max_new_tokens: the oldest exchanges are left out first (a system message
    and the last question always stay); a clear error when the last question alone cannot fit."""
    return fitted(tokenizer, question, context_length, max_new_tokens)[1]


def fitted(tokenizer, question: str | list[dict], context_length: int, max_new_tokens: int) -> tuple[list, list]:
    """(the conversation that fits, its prompt ids): `prompt_ids`, with the turns it kept (an engine behind HTTP is
    sent their text)."""
    messages = as_messages(question)
    system = [m for m in messages if m["role"] == "system"]
    turns = [m for m in messages if m["role"] != "system"]
    room = context_length - max_new_tokens
    for start in range(0, len(turns), 2):  # user, assistant, ..., user: whole exchanges off the front
        ids = encode_conversation(tokenizer, system + turns[start:])
        if len(ids) <= room:
            return system + turns[start:], ids
    raise UserError(f"question is {len(ids)} tokens; with max_new_tokens={max_new_tokens} the model's context "
                    f"of {context_length} tokens leaves room for {room}. Shorten the question")


def validated(question: str | list[dict]) -> list[dict]:
    """The conversation of `question` with its last turn checked by safety.validate_question (ValueError if bad)."""
    messages = as_messages(question)
    if not messages or messages[-1].get("role") != "user":
        raise ValueError("a conversation to answer must end with the user's question")
    return messages[:-1] + [{"role": "user", "content": safety.validate_question(messages[-1]["content"])}]


def last_question(question: str | list[dict]) -> str | None:
    """The text a record names as its question: the question, or a conversation's last user turn."""
    messages = as_messages(question)
    return messages[-1].get("content") if messages and isinstance(messages[-1], dict) else None


def context_length(model) -> int:
    return int(getattr(model.config, "max_position_embeddings", 2048))


@torch.no_grad()
def generate_texts(model, tokenizer, questions: list[str | list[dict]], sampling: Sampling) -> list[str]:
    """Raw generated answers for already validated questions, batched.

    Left padding: a decoder continues from each row's last position, so every row's prompt must end there; with
    right padding the shorter prompts would continue after their pad tokens."""
    rows = [prompt_ids(tokenizer, q, context_length(model), sampling.max_new_tokens) for q in questions]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    torch.manual_seed(sampling.seed)
    out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                         **generate_kwargs(tokenizer, sampling))
    return [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]


def answer_batch(model, tokenizer, questions: list[str | list[dict]], sampling: Sampling | None = None,
                 model_name: str = "", adapter: str | None = None, ids: list | None = None,
                 index=None) -> list[dict]:
    """Records for `questions` (texts or conversations), in order, each with its `ids` entry as "id" where given.
    A bad question gets a record with an "error" and no answer; the others are still answered. With `index` (a
    retrieval.Index) the relevant passages go into the prompt and the record names them as "sources"."""
    sampling = sampling or Sampling()
    records: list[AnswerRecord | None] = []
    todo = []  # (index in records, validated conversation, record context)
    for n, question in enumerate(questions):
        context = context_of(question, ids[n] if ids else None)
        try:
            todo.append((len(records), validated(question), context))
            records.append(None)
        except ValueError as e:
            records.append(error_record(last_question(question), str(e), model=model_name, adapter=adapter, **context))
    screenings = safety.screen_conversations([m for _, m, _ in todo])  # one batched pass of the triage model
    rest, window, new = [], context_length(model), sampling.max_new_tokens
    for (i, messages, context), screening in zip(todo, screenings):
        if screening.urgent:  # escalation + vetted guidance only, however long the question: nothing generated
            records[i] = answer_record(last_question(questions[i]), safety.compose(screening, ""), model_name,
                                       adapter, context)
            continue
        try:
            prompt_ids(tokenizer, messages, window, new)
            rest.append((i, messages, context, screening))
        except ValueError as e:
            records[i] = error_record(last_question(questions[i]), str(e), model=model_name, adapter=adapter, **context)
    if rest:
        plain = [m for _, m, _, _ in rest]  # screened on the user's words only; the passages come after
        grounded = fitting(ground(index, plain), plain, tokenizer, window, new)
        generated = generate_texts(model, tokenizer, [messages for messages, _ in grounded], sampling)
        for (i, _, context, screening), (_, sources), raw in zip(rest, grounded, generated):
            composed = safety.with_sources(safety.compose(screening, raw, false_claims(sources)), sources)
            records[i] = answer_record(last_question(questions[i]), composed, model_name, adapter, context)
    return records


def false_claims(sources: list[dict] | None) -> tuple[str, ...]:
    """What the guard drops from an answer given no passage (no index, or nothing relevant): a grounded adapter's
    "The source I found ... It says: ..." (prompts.RELATED_ONLY), which would be about a source never given."""
    return () if sources else SOURCE_CLAIMS


def fitting(grounded: list[tuple], plain: list[list[dict]], tokenizer, context: int, max_new_tokens: int) -> list:
    """`grounded` (retrieval.ground's pairs), except where the passage would push the prompt over the context: that
    question is answered without it (and says so: no source), never an error (the question alone fits)."""
    out = []
    for (messages, sources), original in zip(grounded, plain):
        try:
            if sources:
                prompt_ids(tokenizer, messages, context, max_new_tokens)
            out.append((messages, sources))
        except UserError:
            out.append((original, []))
    return out


def fixed_answer(screening, question: str | list[dict], model_name: str = "",
                 adapter: str | None = None) -> Iterator[str | dict]:
    """The stream of an emergency or crisis answer: escalation, vetted guidance, closing lines, disclaimer, record.
    No model runs, so it is shown at once, even when the server is busy generating for others."""
    record = answer_record(last_question(question), safety.compose(screening, ""), model_name, adapter,
                           context_of(question))
    paragraphs = record["answer"].split("\n\n")
    yield paragraphs[0]  # the escalation alone first: the web page shows it as its banner
    for paragraph in paragraphs[1:] + [record["disclaimer"]]:
        yield "\n\n" + paragraph
    yield record


class Generation:
    """One model.generate in a thread, streaming text; it ends at a stop id, at max_new_tokens, or after the current
    token once `stop` (the caller's: its client left) or `halt` (a stop string was seen) is set."""

    def __init__(self, model, tokenizer, ids: list[int], sampling: Sampling, stop: threading.Event):
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        halt = self.halt = threading.Event()

        class _StopOnEvent(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                ended = stop.is_set() or halt.is_set()
                return torch.full((input_ids.shape[0],), ended, dtype=torch.bool, device=input_ids.device)

        self.streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        inputs = torch.tensor([ids], device=model.device)
        self.kwargs = dict(input_ids=inputs, attention_mask=torch.ones_like(inputs), streamer=self.streamer,
                           stopping_criteria=StoppingCriteriaList([_StopOnEvent()]),
                           **generate_kwargs(tokenizer, sampling))
        self.model, self.n_prompt, self.stops = model, len(ids), set(stop_ids(tokenizer))
        self.max_new_tokens, self.new_ids, self.failure = sampling.max_new_tokens, [], []
        torch.manual_seed(sampling.seed)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            with torch.no_grad():
                self.new_ids = self.model.generate(**self.kwargs)[0, self.n_prompt:].tolist()
        except Exception as e:  # end the stream, else the reader waits forever; re-raised by join()
            self.failure.append(e)
            self.streamer.end()

    def join(self) -> Outcome:
        self.thread.join()
        if self.failure:
            raise self.failure[0]
        return outcome_of(self.new_ids, self.max_new_tokens, self.stops, self.halt.is_set())


def outcome_of(new_ids: list[int], max_new_tokens: int, stops, halted: bool) -> Outcome:
    """"length" when max_new_tokens cut the answer (not its end of turn, not a stop string), else "stop"."""
    cut = len(new_ids) >= max_new_tokens and new_ids[-1] not in stops and not halted
    return Outcome(len(new_ids), "length" if cut else "stop")


def _start(model, tokenizer, messages: list[dict], ids: list[int], sampling: Sampling, stop: threading.Event):
    """The generation of one answer: a local model's, or that of a model with its own `start` (an engine behind HTTP,
    medassist.upstream.Upstream, sent our template's text; the server's batching.Batcher, sent the ids): the same
    streamer/halt/join."""
    if hasattr(model, "start"):
        return model.start(messages, ids, sampling, stop)
    return Generation(model, tokenizer, ids, sampling, stop)


def stream_answer(model, tokenizer, question: str | list[dict], sampling: Sampling | None = None,
                  model_name: str = "", adapter: str | None = None,
                  stop: threading.Event | None = None, screening=None, stop_strings=(),
                  outcome: Outcome | None = None, index=None) -> Iterator[str | AnswerRecord]:
    """Yield the answer as it is generated (str pieces, already through the safety guard), then the record (dict).

    The emergency/crisis lines come first, before any generated text; the closing lines and the disclaimer last.
    The pieces joined equal record["answer"] + "\\n\\n" + record["disclaimer"].
    Setting `stop` (the server does when its client disconnects) or closing the iterator ends generation after the
    current token. `screening`: the caller's (the server screens the whole conversation before queueing).
    `stop_strings` end the generated text (not shown); `outcome`, if given, is filled in before the record comes.
    `index`: answer from the relevant passages of a retrieval.Index; their "Source:" lines come before the disclaimer.
    """
    sampling, outcome = sampling or Sampling(), outcome if outcome is not None else Outcome()
    messages = validated(question)
    screening = screening or safety.screen_conversation(messages)
    if screening.urgent:  # however long the question: the escalation needs no model
        yield from fixed_answer(screening, question, model_name, adapter)
        return
    window, new = context_length(model), sampling.max_new_tokens
    prompt_ids(tokenizer, messages, window, new)  # the question itself must fit
    ((grounded, sources),) = fitting(ground(index, [messages]), [messages], tokenizer, window, new)
    kept, ids = fitted(tokenizer, grounded, window, new)
    stop = stop or threading.Event()
    generation, cut = _start(model, tokenizer, kept, ids, sampling, stop), StopAt(stop_strings)
    said = bool(screening.preface)  # paragraphs are joined by a blank line, as in safety.compose
    guard, generated, first = safety.stream_guard(screening, false_claims(sources)), [], True
    try:
        if screening.preface:
            yield screening.preface
        for piece in chain(generation.streamer, [None]):  # None: the end, where held-back text is let out
            piece = cut.feed(piece) if piece is not None else cut.close()
            if cut.hit:
                generation.halt.set()
            generated.append(piece)
            if shown := guard.feed(piece):
                yield ("\n\n" if said and first else "") + shown
                said, first = True, False
    except BaseException:  # GeneratorExit when the caller closes this iterator early: generate for nobody no more
        stop.set()
        raise
    ended = generation.join()
    outcome.tokens, outcome.finish_reason = ended.tokens, ended.finish_reason
    if rest := guard.close():
        yield ("\n\n" if said and first else "") + rest
        said = True
    for line in safety.closing_lines(screening):
        yield ("\n\n" if said else "") + line
        said = True
    if sources is not None:
        yield ("\n\n" if said else "") + safety.sources_text(sources)
    composed = safety.with_sources(safety.compose(screening, "".join(generated).strip(), false_claims(sources)),
                                   sources)
    record = answer_record(last_question(question), composed, model_name, adapter, context_of(question))
    yield "\n\n" + record["disclaimer"]
    yield record


def read_adapter_meta(adapter: str | Path) -> dict:
    """medassist.json of an adapter directory (base model, template, quantization), with a clear error if absent."""
    path = Path(adapter)
    if not (path / "adapter_config.json").is_file():
        raise UserError(f"{adapter}: not a LoRA adapter directory (no adapter_config.json); pass the "
                        f"lora_adapter/ directory written by fit, e.g. checkpoints/lora/version_0/lora_adapter")
    meta_file = path / ADAPTER_META
    return json.loads(meta_file.read_text()) if meta_file.is_file() else {}


def load_for_generation(adapter: str | None = None, base_model: str | None = None, precision: str = "auto",
                        allow_template_mismatch: bool = False, decode_weights: str = "int8"):
    """(model, tokenizer, model_name): the base in its compute dtype (not quantized), the adapter merged into it.

    Merging into the unquantized base (merged into int8 weights, the adapter's small update would mostly round away)
    and generating with a KV cache is faster than an unmerged int8 PeftModel, and gives the answers of base + adapter.
    decode_weights="int8" (on CPU): decode steps multiply by an int8 copy of the merged weights (int8_decode.py),
    "dense": by the merged weights themselves.
    """
    from medassist.loading import load_model, load_tokenizer

    if decode_weights not in DECODE_WEIGHTS:
        raise UserError(f"decode_weights must be one of {', '.join(DECODE_WEIGHTS)}, got {decode_weights!r}")
    meta = read_adapter_meta(adapter) if adapter else {}
    base_model = base_model or meta.get("base_model") or "embedded"
    export = Path(base_model) / ADAPTER_META  # a directory written by `medassist merge` records its template too
    for source, info in ((adapter, meta), (base_model, json.loads(export.read_text()) if export.is_file() else {})):
        if not allow_template_mismatch:
            check_template(info.get("template"), source, "Use a matching medassist version, or pass "
                                                         "--allow-template-mismatch to answer anyway")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(base_model, quantization="none", precision=precision, device=device)
    tokenizer = load_tokenizer(base_model)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    # generate() feeds the head a strided slice (the last position); with a frozen head torch.matmul then takes a bmm
    # path that copies the whole 262k x d weight for every token (BENCHMARKS.md: 0.18 s instead of 4.9 s to first token)
    # (.contiguous() is a no-op there: torch ignores the strides of size-1 dimensions; a clone resets them)
    model.get_output_embeddings().register_forward_pre_hook(
        lambda m, a: (a[0].clone(memory_format=torch.contiguous_format),))
    if decode_weights == "int8" and device == "cpu":  # on CUDA the dense GEMMs are not what bounds decoding
        quantize_for_decoding(model)
    model.config.use_cache = True
    model.eval()
    return model, tokenizer, base_model


class Assistant:
    """A loaded model ready to answer: `answer(q)`, `answer_batch(qs)`, `stream(q)`; q a question or a
    conversation that ends with one."""

    def __init__(self, adapter: str | None = None, base_model: str | None = None, precision: str = "auto",
                 sampling: Sampling | None = None, allow_template_mismatch: bool = False, index=None,
                 decode_weights: str = "int8"):
        self.adapter, self.index = (str(adapter) if adapter else None), index
        self.sampling = sampling or Sampling()
        self.model, self.tokenizer, self.model_name = load_for_generation(
            adapter, base_model, precision, allow_template_mismatch, decode_weights)

    def answer_batch(self, questions: list[str | list[dict]], ids: list | None = None) -> list[dict]:
        return answer_batch(self.model, self.tokenizer, questions, self.sampling, self.model_name, self.adapter, ids,
                            self.index)

    def answer(self, question: str | list[dict]) -> dict:
        record = self.answer_batch([question])[0]
        if "error" in record:
            raise UserError(record["error"])
        return record

    def stream(self, question: str | list[dict]) -> Iterator[str | dict]:
        return stream_answer(self.model, self.tokenizer, question, self.sampling, self.model_name, self.adapter,
                             index=self.index)

    def settings(self) -> dict:
        return asdict(self.sampling)
