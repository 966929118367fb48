"""Continuous batching (medassist.batching): rows joining and leaving a running batch get the tokens they get alone.

The tiny model's sliding window is 64 positions, so the rows here run past it: the joins, the leaves and the trimmed
padding are checked on both kinds of cache layer.
"""

import threading
import time

import pytest
import torch

from medassist.batching import Batcher, Row
from medassist.generate import Generation, load_for_generation, prompt_ids
from medassist.loading import cpu_has_native_bf16
from medassist.sampling import Sampling

QUESTIONS = ["What is asthma?", "How can I lower my blood pressure at home without medicine, and what should I eat?",
             "Flu?", "What are the early signs of type 2 diabetes in adults who are overweight?", "What is gout?"]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    # dense decoding: the logits are checked against a full forward pass (test_int8_decode covers int8 rows)
    model, tokenizer, _ = load_for_generation(None, str(tiny_model_dir), precision="fp32", decode_weights="dense")
    return model, tokenizer


def alone(model, tokenizer, ids, sampling):
    generation = Generation(model, tokenizer, ids, sampling, threading.Event())
    text = "".join(generation.streamer)
    outcome = generation.join()
    return text, generation.new_ids, outcome


def together(batcher, jobs, gap: float = 0.05):
    """Start the rows one after another, `gap` seconds apart (later ones join a running batch); the rows and their
    (text, ids, outcome)."""
    rows = []
    for ids, sampling in jobs:
        rows.append(batcher.start(None, ids, sampling, threading.Event()))
        time.sleep(gap)
    return rows, [("".join(row.streamer), row.new_ids, row.join()) for row in rows]


def recording(monkeypatch):
    """Row.choose records the logits each decision is made from (row -> list of tensors)."""
    seen, choose = {}, Row.choose

    def record(row, logits):
        seen.setdefault(row, []).append(logits.clone())
        return choose(row, logits)

    monkeypatch.setattr(Row, "choose", record)
    return seen


def full_sequence_logits(model, ids, new_ids):
    """The logits behind each generated token, from one forward pass over the whole text: no cache, no padding."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids + new_ids[:-1]])).logits[0, len(ids) - 1:]


def test_rows_that_join_and_leave_get_the_answer_they_get_alone(tiny, monkeypatch):
    model, tokenizer = tiny
    seen = recording(monkeypatch)
    # different prompt lengths, answer lengths (some end by length early, one runs past the sliding window), and a
    # sampled row with its seed: every row must decode as it does alone
    settings = [Sampling(max_new_tokens=n, temperature=t, seed=s)
                for n, t, s in [(90, 0, 0), (12, 0, 0), (40, 0.8, 3), (70, 0, 0), (5, 0, 0)]]
    jobs = [(prompt_ids(tokenizer, q, 1024, s.max_new_tokens), s) for q, s in zip(QUESTIONS, settings)]
    expected = [alone(model, tokenizer, ids, s) for ids, s in jobs]
    batcher = Batcher(model, tokenizer, max_batch=3)  # fewer slots than rows: two wait for a row to end
    try:
        rows, got = together(batcher, jobs)
    finally:
        batcher.close()
    for (text, ids, outcome), (want_text, want_ids, want_outcome) in zip(got, expected):
        assert ids == want_ids and text == want_text
        assert outcome == want_outcome
    assert [o.tokens for _, _, o in got] == [90, 12, 40, 70, 5]  # the random tiny model never says end of turn
    # the tiny random model's argmax hardly depends on the context, so the logits are compared too: a wrong position,
    # mask or cache row shows here even where the tokens happen to agree
    for (ids, _), row in zip(jobs, rows):
        assert torch.allclose(torch.stack(seen[row]), full_sequence_logits(model, ids, row.new_ids), atol=1e-4)
    assert batcher.rows == [] and batcher.cache is None  # everything left the batch


def test_a_row_stopped_mid_answer_ends_there_and_the_others_are_unchanged(tiny, monkeypatch):
    model, tokenizer = tiny
    sampling = Sampling(max_new_tokens=60)
    jobs = [prompt_ids(tokenizer, q, 1024, 60) for q in QUESTIONS[:3]]
    expected = [alone(model, tokenizer, ids, sampling)[1] for ids in jobs]
    batcher = Batcher(model, tokenizer, max_batch=4)
    try:
        rows = [batcher.start(None, ids, sampling, threading.Event()) for ids in jobs]
        accept = Row.accept

        def events_at_their_token(row, token):  # as the server would: the client leaves / a stop string is seen
            if row is rows[1] and len(row.new_ids) == 5:
                row.stop.set()
            if row is rows[2] and len(row.new_ids) == 9:
                row.halt.set()
            return accept(row, token)

        monkeypatch.setattr(Row, "accept", events_at_their_token)
        outcomes = [row.join() for row in rows]
    finally:
        batcher.close()
    assert rows[0].new_ids == expected[0] and outcomes[0].finish_reason == "length"
    for row, outcome, want, n in zip(rows[1:], outcomes[1:], expected[1:], (6, 10)):
        assert row.new_ids == want[:n]  # ended after the token during which the event came
        assert outcome.finish_reason == "stop" and outcome.tokens == n


def undriven_rows(batcher, tokenizer, *jobs):
    """Rows for (question, max_new_tokens) pairs, not queued: the test drives the batcher step by step itself (its
    thread waits for requests meanwhile)."""
    return [Row(batcher, prompt_ids(tokenizer, q, 1024, n), Sampling(max_new_tokens=n), threading.Event())
            for q, n in jobs]


def test_a_row_that_joins_a_batch_past_the_sliding_window_decodes_as_alone(tiny, monkeypatch):
    """Driven step by step: a long row runs past the 64-position window, then a short one joins it."""
    model, tokenizer = tiny
    seen = recording(monkeypatch)
    batcher = Batcher(model, tokenizer)
    rows = undriven_rows(batcher, tokenizer, (QUESTIONS[1], 90), (QUESTIONS[2], 40))
    try:
        with torch.no_grad():
            batcher._admit(rows[0])
            for _ in range(70):
                batcher._step()
            assert batcher.mask.shape[1] > 64  # the batch is past the window when the short row joins
            batcher._admit(rows[1])
            while batcher.rows:
                batcher._step()
    finally:
        batcher.close()
    for row in rows:
        assert row.new_ids == alone(model, tokenizer, row.ids, row.sampling)[1]
        assert torch.allclose(torch.stack(seen[row]), full_sequence_logits(model, row.ids, row.new_ids), atol=1e-4)


def test_a_closed_batcher_refuses_new_rows_and_fails_the_ones_left_waiting(tiny):
    model, tokenizer = tiny
    batcher = Batcher(model, tokenizer)
    batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.start(None, [1, 2, 3], Sampling(max_new_tokens=4), threading.Event())
    left = Row(batcher, [1, 2, 3], Sampling(max_new_tokens=4), threading.Event())
    batcher.waiting.put(left)  # one that got in as it closed
    batcher.close()  # a second close: the thread is gone; the waiting row is told
    with pytest.raises(RuntimeError, match="closed"):
        left.join()


def test_a_request_whose_client_left_while_waiting_is_never_computed(tiny):
    model, tokenizer = tiny
    gone = threading.Event()
    gone.set()
    batcher = Batcher(model, tokenizer)
    try:
        row = batcher.start(None, prompt_ids(tokenizer, "What is asthma?", 1024, 20), Sampling(max_new_tokens=20), gone)
        outcome = row.join()
    finally:
        batcher.close()
    assert row.new_ids == [] and outcome.tokens == 0 and "".join(row.streamer) == ""


def test_a_failing_step_fails_its_rows_and_the_batcher_goes_on(tiny, monkeypatch):
    model, tokenizer = tiny
    sampling = Sampling(max_new_tokens=8)
    ids = prompt_ids(tokenizer, "What is gout?", 1024, 8)
    batcher = Batcher(model, tokenizer)
    try:
        real, calls = type(model).forward, []

        def broken_once(self, *args, **kwargs):  # the first decode step runs out of memory
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("out of memory")
            return real(self, *args, **kwargs)

        monkeypatch.setattr(type(model), "forward", broken_once)
        failed = batcher.start(None, ids, sampling, threading.Event())
        with pytest.raises(RuntimeError, match="out of memory"):
            failed.join()
        monkeypatch.setattr(type(model), "forward", real)
        after = batcher.start(None, ids, sampling, threading.Event())
        assert after.join().tokens == 8 and after.new_ids == alone(model, tokenizer, ids, sampling)[1]
    finally:
        batcher.close()


def test_the_shared_cache_keeps_no_column_that_no_row_uses(tiny):
    """Driven step by step: a long prompt and a short one share the batch, left-padded to the long one; once the
    long one leaves, its padding columns go too."""
    model, tokenizer = tiny
    batcher = Batcher(model, tokenizer)
    rows = undriven_rows(batcher, tokenizer, (QUESTIONS[3], 70), (QUESTIONS[2], 80))
    long, short = (row.ids for row in rows)
    try:
        with torch.no_grad():
            for row in rows:
                batcher._admit(row)
            assert batcher.mask.tolist()[1] == [0] * (len(long) - len(short)) + [1] * len(short)
            while rows[0] in batcher.rows:
                batcher._step()
            seen = len(short) + len(rows[1].new_ids) - 1  # the short row's tokens in the cache (not its last yet)
            assert batcher.rows == [rows[1]] and batcher.mask.shape == (1, seen) and bool(batcher.mask.all())
            for layer in batcher.cache.layers:  # sliding layers keep their window's last 63 positions, full ones all
                assert layer.keys.shape[2] == (min(seen, 63) if layer.is_sliding else seen)
            while batcher.rows:
                batcher._step()
    finally:
        batcher.close()
    assert rows[1].new_ids == alone(model, tokenizer, short, Sampling(max_new_tokens=80))[1]
    assert rows[0].new_ids == alone(model, tokenizer, long, Sampling(max_new_tokens=70))[1]


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="no native bf16 here: the server computes in fp32 (auto), "
                                                     "checked against generate in the first test")
def test_in_bf16_a_row_computes_bit_for_bit_what_it_computes_alone(tiny_model_dir, monkeypatch):
    """bf16 rounds every product: one batched attention call over padded keys rounds differently from the call a row
    gets alone, and greedy answers drift apart after a few tokens. The batcher attends row by row, so a row's logits
    are the same bits with or without company here. (The tiny model's dense linears round a row alike alone and in a
    batch; the embedded model's bf16 GEMM does not always, README "Serving": what int8 decode weights fix.)"""
    model, tokenizer, _ = load_for_generation(None, str(tiny_model_dir), precision="bf16")
    seen = recording(monkeypatch)
    jobs = [(prompt_ids(tokenizer, q, 1024, 70), Sampling(max_new_tokens=70)) for q in QUESTIONS]
    batcher = Batcher(model, tokenizer, max_batch=8)
    try:
        lone = [together(batcher, [job])[0][0] for job in jobs]
        rows, _ = together(batcher, jobs, gap=0.02)
    finally:
        batcher.close()
    for first, second in zip(lone, rows):
        assert first.new_ids == second.new_ids
        assert all(torch.equal(a, b) for a, b in zip(seen[first], seen[second]))


def test_int8_decode_rows_get_the_tokens_and_logits_they_get_alone(tiny_model_dir, monkeypatch):
    """The default on CPU, int8 decode weights (tests/test_int8_decode.py): its kernel computes each row on its own,
    so in fp32 too a row gets generate's tokens, and the same logits bits alone in the batcher and beside others."""
    model, tokenizer, _ = load_for_generation(None, str(tiny_model_dir), precision="fp32")
    seen = recording(monkeypatch)
    jobs = [(prompt_ids(tokenizer, q, 1024, 30), Sampling(max_new_tokens=30)) for q in QUESTIONS[:3]]
    lone = [alone(model, tokenizer, ids, sampling)[1] for ids, sampling in jobs]
    batcher = Batcher(model, tokenizer, max_batch=3)
    try:
        (first,), _ = together(batcher, jobs[:1])
        rows, got = together(batcher, jobs, gap=0)
    finally:
        batcher.close()
    assert [ids for _, ids, _ in got] == lone
    assert len(seen[first]) == 30 and all(torch.equal(a, b) for a, b in zip(seen[first], seen[rows[0]]))
