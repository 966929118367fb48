"""Continuous batching for `python -m medassist serve`: the answers being generated share one model step per token.

Decoding a 270M model on a CPU is bound by reading its weights (the 262k-row head is most of them), so a step that
decodes four rows costs little more than a step for one. Each request is prefilled alone, as it would be if it were
the only one, and its KV cache then joins the batch's between two steps; a row that ends (its end of turn,
max_new_tokens, a stop string, its client gone) leaves after the current token. Every row streams, stops and ends
on its own, exactly as generate.Generation does, and keeps its own logits processors and random generator; its
attention is computed for it alone (`_rows_attention`), so its tokens do not depend on who else is in the batch
(tests/test_batching.py: generate's tokens, logits within 1e-4 of a full forward pass in fp32; bit for bit the
logits it gets alone in bf16, measured on a CPU).

Why by hand: transformers' continuous batching (5.x `init_continuous_batching`) drops the repetition penalty
(RepetitionPenaltyLogitsProcessor.supports_continuous_batching is False), which medassist's decoding default uses,
so its answers would not be the ones a request gets alone. Here the cache is transformers' own DynamicCache and the
logits processors are the ones `generate` builds; what is ours is only the joining and leaving of rows.
"""

import logging
import queue
import threading

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, TextIteratorStreamer
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from medassist.generate import Outcome, generate_kwargs, outcome_of
from medassist.prompts import stop_ids
from medassist.sampling import Sampling

log = logging.getLogger("medassist.serve")

# rows per step by default: twice the 4 clients of README's load test; a row costs its KV cache (gemma-3-270m:
# 18 layers x keys and values of 256 numbers, 18 KB a token in bf16), and a step's time grows with the rows
MAX_BATCH = 8


class Row:
    """One request in the batch, with the interface of generate.Generation: `streamer` (its text as it comes),
    `halt` (set: end after the current token), `join()` -> generate.Outcome."""

    def __init__(self, batcher: "Batcher", ids: list[int], sampling: Sampling, stop: threading.Event):
        self.ids, self.new_ids, self.sampling, self.stop = list(ids), [], sampling, stop
        self.halt, self.ended, self.failure = threading.Event(), threading.Event(), []
        self.streamer = TextIteratorStreamer(batcher.tokenizer, skip_prompt=False, skip_special_tokens=True)
        self.processors = batcher.processors(sampling, len(ids))
        # its own generator, seeded as generate.Generation seeds the global one: the same draws, whoever else runs
        sampled = sampling.temperature > 0
        self.generator = torch.Generator(device=batcher.device).manual_seed(sampling.seed) if sampled else None
        self.stops = batcher.stops

    def choose(self, logits: torch.Tensor) -> int:
        """The next token from this row's last logits, as generate chooses it (float32, processors, argmax/sample)."""
        seen = torch.tensor([self.ids + self.new_ids], device=logits.device)
        scores = self.processors(seen, logits.to(torch.float32)[None])
        if self.generator is None:
            return int(scores.argmax(-1))
        return int(torch.multinomial(F.softmax(scores, dim=-1), 1, generator=self.generator))

    def accept(self, token: int) -> bool:
        """Take `token`; True when the row has ended (as generate stops: a stop id, max_new_tokens, or an event)."""
        self.new_ids.append(token)
        self.streamer.put(torch.tensor([token]))
        return (token in self.stops or len(self.new_ids) >= self.sampling.max_new_tokens
                or self.stop.is_set() or self.halt.is_set())

    def finish(self, failure: Exception | None = None) -> None:
        if failure is not None:
            self.failure.append(failure)
        self.streamer.end()
        self.ended.set()

    def join(self) -> Outcome:
        self.ended.wait()
        if self.failure:
            raise self.failure[0]
        return outcome_of(self.new_ids, self.sampling.max_new_tokens, self.stops, self.halt.is_set())


class Batcher:
    """The model behind a queue: `start(messages, ids, sampling, stop)` returns a Row that one thread decodes,
    together with the others, `max_batch` rows at most (more wait for a row to end). It reads as a model to
    generate.stream_answer (`config`, `device`, `start`). It sets the model's attention to ATTENTION, which is
    transformers' sdpa wherever one row or a prompt is computed."""

    def __init__(self, model, tokenizer, max_batch: int = MAX_BATCH):
        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch
        _register_attention()
        model.set_attn_implementation(ATTENTION)
        self.config, self.device, self.stops = model.config, model.device, set(stop_ids(tokenizer))
        self.waiting: queue.SimpleQueue = queue.SimpleQueue()
        self.closed = False
        self.rows: list[Row] = []
        self.cache, self.mask = None, None  # the batch's DynamicCache and its [rows, length] attention mask
        self.thread = threading.Thread(target=self._loop, daemon=True, name="batcher")
        self.thread.start()

    def start(self, messages, ids: list[int], sampling: Sampling, stop: threading.Event) -> Row:
        if self.closed:
            raise RuntimeError("the batcher is closed")
        row = Row(self, ids, sampling, stop)
        self.waiting.put(row)
        return row

    def close(self) -> None:
        """End the thread once the rows it has are done; rows still waiting fail (tests; a server that stops)."""
        self.closed = True
        self.waiting.put(None)
        self.thread.join()
        while not self.waiting.empty():  # started while closing: nobody will decode them, so say so
            if (row := self.waiting.get()) is not None:
                row.finish(RuntimeError("the batcher is closed"))

    def processors(self, sampling: Sampling, prompt_length: int):
        """The logits processors model.generate builds for these settings (repetition penalty; temperature, top-k,
        top-p when sampling), from transformers' own builders, so a row decodes as it would alone. They are private
        methods, the only way to get exactly generate's list; tests/test_batching.py compares with generate, so a
        transformers release that changes them fails there, not in a user's answers."""
        config, _ = self.model._prepare_generation_config(None, **generate_kwargs(self.tokenizer, sampling))
        return self.model._get_logits_processor(generation_config=config, input_ids_seq_length=prompt_length,
                                                device=self.device)

    # ---- the decoding thread --------------------------------------------------------------------------------------
    def _loop(self) -> None:
        closing = False
        while not closing or self.rows:
            while not closing and self._takes_more():
                row = self.waiting.get()  # blocks only when idle
                closing = row is None
                if row is not None:
                    self._admit(row)
            if self.rows:
                self._guarded(self._step)

    def _takes_more(self) -> bool:
        """Idle (then it waits for a request), or a request waits and the batch has room for it."""
        return not self.rows or (len(self.rows) < self.max_batch and not self.waiting.empty())

    def _guarded(self, work, *rows: Row) -> None:
        """Run `work`; on an error (a bug, out of memory) the rows it concerns fail, and the batcher goes on."""
        try:
            with torch.no_grad():
                work(*rows)
        except Exception as e:
            log.exception("batched generation failed")
            for row in rows or self.rows:
                row.finish(e)
            if not rows:
                self.rows, self.cache, self.mask = [], None, None

    def _admit(self, row: Row) -> None:
        if row.stop.is_set():  # its client left while it waited
            row.finish()
            return
        self._guarded(self._prefill, row)

    def _prefill(self, row: Row) -> None:
        """The row's prompt alone (the computation generate does for it alone), then its cache joins the batch."""
        out = self.model(input_ids=torch.tensor([row.ids], device=self.device), use_cache=True, logits_to_keep=1)
        if row.accept(row.choose(out.logits[0, -1])):
            row.finish()
            return
        self._join(out.cache, len(row.ids))
        self.rows.append(row)

    def _step(self) -> None:
        """One token for every row; the rows that end leave the batch."""
        last = torch.tensor([[row.new_ids[-1]] for row in self.rows], device=self.device)
        self.mask = F.pad(self.mask, (0, 1), value=1)
        positions = self.mask.sum(1, keepdim=True) - 1  # each row's own position: its padding does not count
        out = self.model(input_ids=last, attention_mask=self.mask, position_ids=positions,
                         cache=self.cache, use_cache=True, logits_to_keep=1)
        self.cache = out.cache
        ended = [row.accept(row.choose(out.logits[i, -1])) for i, row in enumerate(self.rows)]
        if any(ended):
            for row, end in zip(self.rows, ended):
                if end:
                    row.finish()
            self._leave([i for i, end in enumerate(ended) if not end])

    # ---- the shared cache: rows left-padded to one length ---------------------------------------------------------
    def _join(self, cache, length: int) -> None:
        """Add a one-row cache of `length` tokens: both sides padded on the left to the longer, the padding masked."""
        ones = torch.ones(1, length, dtype=torch.long, device=self.device)
        if self.cache is None:
            list(_layers(cache))  # a cache it could not pad or cut fails its first request, not the second
            self.cache, self.mask = cache, ones
            return
        total = max(self.mask.shape[1], length)
        # every new tensor first, then all assigned: a failure (out of memory) leaves the batch as it was
        layers = list(zip(_layers(self.cache), _layers(cache)))
        joined = []
        for mine, theirs in layers:
            keep = _kept(mine, total)
            joined.append([torch.cat([_pad_left(a, keep), _pad_left(b, keep)])
                           for a, b in ((mine.keys, theirs.keys), (mine.values, theirs.values))])
        mask = torch.cat([_pad_left(self.mask, total), _pad_left(ones, total)])
        for (mine, _), (keys, values) in zip(layers, joined):
            mine.keys, mine.values = keys, values
            if mine.is_sliding:
                mine.cumulative_length = total
        self.mask = mask

    def _leave(self, keep: list[int]) -> None:
        """Keep only the rows `keep`, and drop the columns that are padding in all of them."""
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.cache, self.mask = None, None
            return
        index = torch.tensor(keep, device=self.device)
        self.mask = self.mask[index]
        unused = int((self.mask.cumsum(1) == 0).sum(1).min())  # leading columns that no row uses
        self.mask = self.mask[:, unused:]
        total = self.mask.shape[1]
        for layer in _layers(self.cache):
            n = _kept(layer, total)
            layer.keys, layer.values = layer.keys[index, :, -n:], layer.values[index, :, -n:]
            if layer.is_sliding:
                layer.cumulative_length = total


ATTENTION = "medassist_rows"  # transformers' sdpa, called for each row of a decode step on its own keys


def _rows_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' sdpa attention for a decode step, one row at a time on the key columns it attends, unmasked:
    the call the row gets when it is alone. One batched call over left-padded keys takes another kernel path
    (masked; the grouped heads repeated), whose bf16 rounding differs: measured, 3 of 8 greedy answers then
    diverged from their alone text (README "Serving"). The linear layers stay batched: that is where the time is."""
    if query.shape[0] == 1 or query.shape[2] != 1:  # one row, or a prompt: as transformers does it
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    outputs = []
    for b in range(query.shape[0]):
        # left padding: a row attends the columns from its first unmasked one on (bool mask: True = attend)
        start = 0 if attention_mask is None else int(attention_mask[b, 0, 0].to(torch.uint8).argmax())
        out, _ = sdpa_attention_forward(module, query[b:b + 1], key[b:b + 1, :, start:], value[b:b + 1, :, start:],
                                        None, **kwargs)
        outputs.append(out)
    return torch.cat(outputs), None


def _register_attention() -> None:
    AttentionInterface.register(ATTENTION, _rows_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def _layers(cache):
    for layer in cache.layers:
        if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer):  # what can be padded and cut by rows
            raise RuntimeError(f"batching supports DynamicCache layers, not {type(layer).__name__}: serve with "
                               f"--max-batch 1")
        yield layer


def _kept(layer, total: int) -> int:
    """How many positions a layer keeps for a batch `total` long: all, or a sliding window's last ones (window - 1:
    what DynamicSlidingWindowLayer.update keeps, the new token making up the window)."""
    return min(total, layer.sliding_window - 1) if layer.is_sliding else total


def _pad_left(t: torch.Tensor, length: int) -> torch.Tensor:
    """`t` ([rows, length] mask or [rows, heads, length, dim] states) padded with zeros on the left to `length`."""
    dim = 1 if t.dim() == 2 else 2
    missing = length - t.shape[dim]
    return F.pad(t, (missing, 0) if dim == 1 else (0, 0, missing, 0)) if missing > 0 else t
