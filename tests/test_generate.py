"""The answer path on a tiny model: records, safety around generation, streaming, batching, and the CLIs."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from medassist import UserError, safety
from medassist.generate import Assistant, Outcome, Sampling, load_for_generation, stream_answer
from medassist.records import KEYS as RECORD_KEYS

ROOT = Path(__file__).resolve().parents[1]
KEYS = ["question", "answer", "disclaimer", "flags", "model", "adapter"]
# the record type and the keys every path writes agree ("id" and "conversation" only where the question had them,
# "sources" only where an index was used)
assert list(RECORD_KEYS) == ["id", "conversation", *KEYS[:4], "sources", *KEYS[4:], "error"]
SHORT = Sampling(max_new_tokens=12)


@pytest.fixture(scope="module")
def assistant(adapter):
    return Assistant(adapter, sampling=SHORT)


def test_record_shape_and_disclaimer(assistant, adapter, tiny_model_dir):
    record = assistant.answer("What is asthma?")
    assert list(record) == KEYS
    assert record["disclaimer"] == safety.DISCLAIMER and record["adapter"] == str(adapter)
    assert record["model"] == str(tiny_model_dir)  # the base model named in the adapter's medassist.json


def test_emergency_line_comes_first_and_dosing_gets_the_decide_line(assistant):
    emergency, dosing = assistant.answer_batch(
        ["I have crushing chest pain and I'm sweating right now", "How many mg of ibuprofen should I take?"])
    assert emergency["answer"].startswith(safety.EMERGENCY_LINE) and "emergency" in emergency["flags"]
    assert safety.DECIDE_LINE in dosing["answer"] and "dosing_request" in dosing["flags"]


def test_bad_questions_get_errors_and_the_others_are_answered(assistant):
    records = assistant.answer_batch(["What is flu?", "   ", "bad \x00 char", "How does the flu spread? " * 400,
                                      "I have crushing chest pain and I am sweating. " * 300])
    assert "answer" in records[0] and "error" not in records[0]
    assert "empty" in records[1]["error"] and "control character" in records[2]["error"]
    assert re.fullmatch(r"question is \d+ tokens; with max_new_tokens=12 the model's context of 1024 tokens leaves "
                        r"room for 1012\. Shorten the question", records[3]["error"]), records[3]["error"]
    assert list(records[1]) == ["question", "model", "adapter", "error"]
    # too long for the context, but an emergency: the escalation needs no model, so it is still given
    assert records[4]["answer"].startswith(safety.EMERGENCY_LINE) and "error" not in records[4]
    with pytest.raises(UserError):
        assistant.answer("")


def test_batched_generation_equals_one_at_a_time(assistant):
    questions = ["What is flu?", "How can I keep my heart healthy when I get older?"]
    together = assistant.answer_batch(questions)
    alone = [assistant.answer_batch([q])[0] for q in questions]
    assert [r["answer"] for r in together] == [r["answer"] for r in alone]


def test_stream_shows_the_same_text_as_the_record(assistant):
    for question in ("What is flu?", "My dad's face is drooping and he can't talk", "What dose of metformin for me?"):
        pieces = list(assistant.stream(question))
        record = pieces.pop()
        assert isinstance(record, dict) and list(record) == KEYS
        assert "".join(pieces) == f"{record['answer']}\n\n{record['disclaimer']}"
    emergency = list(assistant.stream("I can't breathe and my lips are blue"))
    assert emergency[0] == safety.EMERGENCY_LINE


SAMPLED = dict(temperature=1.5, top_p=1.0, max_new_tokens=30)


def test_outcome_counts_generated_tokens_and_says_why_the_answer_ended(assistant):
    def outcome(question, **sampling):
        ended = Outcome()
        list(stream_answer(assistant.model, assistant.tokenizer, question, Sampling(**sampling), outcome=ended))
        return ended

    # The tiny random model's weights depend on the tests run before it was built, so no seed is known to run on or to
    # stop: every outcome must say "length" exactly when max_new_tokens cut it.
    for seed in range(6):
        ended = outcome("What is flu?", seed=seed, **SAMPLED)
        assert 0 < ended.tokens <= 30 and (ended.finish_reason == "length") == (ended.tokens == 30), (seed, ended)
    assert outcome("I can't breathe and my lips are blue", seed=1, **SAMPLED) == Outcome(0, "stop")  # fixed text


def test_stop_strings_end_the_generated_text(assistant):
    def answer(stops=()):
        ended = Outcome()
        *_, record = stream_answer(assistant.model, assistant.tokenizer, "What is flu?", Sampling(seed=1, **SAMPLED),
                                   stop_strings=stops, outcome=ended)
        return record["answer"], ended

    full, _ = answer()
    assert " can" in full
    cut, ended = answer([" can", "never in it"])
    assert cut == full[: full.index(" can")].strip() and ended.finish_reason == "stop" and ended.tokens < 30


def test_stop_string_split_across_pieces_is_held_back_then_cut():
    from medassist.generate import StopAt

    stop = StopAt(["STOP"])
    assert [stop.feed(p) for p in ("Hello S", "T", "ill ST", "OP here")] == ["Hello ", "", "STill ", ""]
    assert stop.hit and stop.feed("more") == "" and stop.close() == ""
    held = StopAt(["STOP"])
    assert held.feed("end ST") == "end " and held.close() == "ST"  # not a stop string after all: shown at the end
    assert StopAt().feed("anything") == "anything"


def test_adapter_trained_on_another_template_is_refused(adapter, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    for f in adapter.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    meta = json.loads((other / "medassist.json").read_text())
    (other / "medassist.json").write_text(json.dumps({**meta, "template": "alpaca-v0"}))
    with pytest.raises(UserError, match="prompt template 'alpaca-v0'"):
        load_for_generation(str(other))
    with pytest.raises(UserError, match="not a LoRA adapter directory"):
        load_for_generation(str(tmp_path))


def test_merged_export_on_another_template_is_refused(tiny_model_dir, tmp_path):
    export = tmp_path / "export"  # what `medassist merge` writes: a model directory with medassist.json
    shutil.copytree(tiny_model_dir, export)
    (export / "medassist.json").write_text(json.dumps({"template": "alpaca-v0", "base_model": "embedded"}))
    with pytest.raises(UserError, match=r"export was trained with prompt template 'alpaca-v0'"):
        load_for_generation(None, str(export))
    model, _, name = load_for_generation(None, str(export), allow_template_mismatch=True)
    assert name == str(export) and not model.training


def run(*args, **kwargs):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"}, **kwargs)


CHAT = [{"role": "user", "content": "My son is 4 and has a fever."},
        {"role": "assistant", "content": "Fever is common."},
        {"role": "user", "content": "how much paracetamol then?"}]


def test_a_conversation_is_answered_as_a_whole_and_its_record_says_so(assistant):
    from medassist.generate import prompt_ids
    from medassist.prompts import encode_conversation

    record, alone = assistant.answer_batch([CHAT, CHAT[-1]["content"]], ids=["c1", None])
    assert record["id"] == "c1" and record["conversation"] == CHAT[:2] and record["question"] == CHAT[-1]["content"]
    assert list(alone) == KEYS  # a plain question has neither
    assert "dosing_request" in record["flags"]  # the dose request split across turns is one
    ids = prompt_ids(assistant.tokenizer, CHAT, 1024, 12)
    assert ids == encode_conversation(assistant.tokenizer, CHAT)
    assert "My son is 4" in assistant.tokenizer.decode(ids)
    streamed = list(assistant.stream(CHAT))
    assert streamed[-1]["answer"] == record["answer"] and streamed[-1]["conversation"] == CHAT[:2]


def test_the_prompt_budget_drops_the_oldest_exchanges_then_refuses(assistant):
    from medassist.generate import prompt_ids
    from medassist.prompts import encode_conversation

    tokenizer = assistant.tokenizer
    last = encode_conversation(tokenizer, CHAT[-1:])
    assert prompt_ids(tokenizer, CHAT, len(last) + 12, 12) == last  # only room for the question itself
    system = [{"role": "system", "content": "Be brief."}]
    kept = prompt_ids(tokenizer, system + CHAT, len(encode_conversation(tokenizer, system + CHAT[-1:])) + 12, 12)
    assert tokenizer.decode(kept).startswith("<bos><start_of_turn>user\nBe brief.\n\nhow much")
    with pytest.raises(UserError, match="leaves room for 2. Shorten the question"):
        prompt_ids(tokenizer, CHAT, 14, 12)


def test_chat_keeps_the_conversation_until_reset(assistant, monkeypatch, capsys):
    from medassist import ask

    seen, real = [], assistant.stream

    def stream(question):  # the real stream, recording what it was asked
        seen.append(question)
        return real(question)

    monkeypatch.setattr(assistant, "stream", stream)
    lines = iter(["What is asthma?", "And in children?", "/reset", "Is it contagious?", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert ask.chat(assistant) == 0
    assert [len(q) for q in seen] == [1, 3, 1]
    assert seen[1][0]["content"] == "What is asthma?" and seen[1][1]["role"] == "assistant"
    first = assistant.answer("What is asthma?")  # greedy: the answer the chat got for its first question
    assert seen[1][1]["content"] == safety.unrender(first["answer"])  # the model's own text goes back, nothing added
    assert "(new conversation)" in capsys.readouterr().err


def test_predict_file_answers_conversation_lines_with_their_ids(adapter, tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"id": 7, "messages": CHAT}) + "\n" + json.dumps({"messages": CHAT[:2]}) + "\n")
    out = tmp_path / "answers.jsonl"
    result = run("scripts/predict.py", "--adapter", str(adapter), "--max-new-tokens", "4", "--input",
                 str(questions), "--output", str(out))
    assert result.returncode == 2 and f"{questions}:2: the conversation ends with an assistant turn" in result.stderr
    first, second = [json.loads(line) for line in out.read_text().splitlines()]
    assert first["id"] == 7 and first["conversation"] == CHAT[:2] and "dosing_request" in first["flags"]
    assert "error" in second


def test_predict_script_one_question_json_and_bad_input(adapter):
    result = run("scripts/predict.py", "--adapter", str(adapter), "--max-new-tokens", "8", "--json",
                 "How do I prevent the flu?")
    assert result.returncode == 0, result.stderr[-2000:]
    assert list(json.loads(result.stdout)) == KEYS
    plain = run("scripts/predict.py", "--adapter", str(adapter), "--max-new-tokens", "8", "What is flu?")
    assert plain.stdout.rstrip().endswith(safety.DISCLAIMER)
    empty = run("scripts/predict.py", "--adapter", str(adapter), "   ")
    assert empty.returncode == 2 and "empty" in empty.stderr and "Traceback" not in empty.stderr


def test_predict_script_file_mode_keeps_order_and_reports_bad_lines(adapter, tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"question": "What is flu?"}\n{"question": \n{"instruction": "How do I sleep better?"}\n')
    out = tmp_path / "answers.jsonl"
    result = run("scripts/predict.py", "--adapter", str(adapter), "--max-new-tokens", "6", "--input",
                 str(questions), "--output", str(out))
    assert result.returncode == 2 and f"{questions}:2: not valid JSON" in result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r.get("question") for r in records] == ["What is flu?", None, "How do I sleep better?"]
    assert "error" in records[1] and all(r["disclaimer"] == safety.DISCLAIMER for r in (records[0], records[2]))
    missing = run("scripts/predict.py", "--input", str(tmp_path / "none.jsonl"), "--output", str(tmp_path / "o"))
    assert missing.returncode == 2 and "file not found" in missing.stderr and not (tmp_path / "o").exists()


def test_lightning_predict_writes_jsonl(tiny_model_dir, tmp_path):
    from medassist.index import build

    questions = tmp_path / "q.jsonl"
    questions.write_text('{"question": "What is flu?"}\n{"question": "I took too many pills and feel sleepy"}\n')
    collection = tmp_path / "collection.jsonl"  # data.index: predict answers from it, as `ask --index` does
    collection.write_text(json.dumps({"instruction": "How does the flu spread?", "output": "Flu spreads by droplets.",
                                      "source": "CDC", "url": "https://example.org/flu"}) + "\n")
    build([str(collection)], tmp_path / "index")
    out = tmp_path / "pred.jsonl"
    result = run("-m", "medassist", "predict", "--config", "configs/lora.yaml", "--model.base_model",
                 str(tiny_model_dir), "--model.sampling.max_new_tokens", "6", "--data.predict_file", str(questions),
                 "--data.predict_output", str(out), "--trainer.logger", "false", "--trainer.callbacks", "[]",
                 "--trainer.default_root_dir", str(tmp_path), "--data.index", str(tmp_path / "index"))
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert list(records[0]) == [*KEYS[:4], "sources", *KEYS[4:]] and list(records[1]) == KEYS  # urgent: no source
    assert records[0]["sources"][0]["url"] == "https://example.org/flu"
    assert records[1]["answer"].startswith(safety.EMERGENCY_LINE)


@pytest.mark.slow
def test_predict_script_on_the_embedded_gemma_3_270m():
    """The real pretrained model (no adapter: the base answers) through scripts/predict.py, safety included."""
    result = run("scripts/predict.py", "--max-new-tokens", "16", "--json",
                 "My mother's face is drooping and her speech is slurred right now")
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads(result.stdout)
    assert record["model"] == "embedded" and record["adapter"] is None
    assert record["answer"].startswith(safety.EMERGENCY_LINE) and len(record["answer"]) > len(safety.EMERGENCY_LINE)
