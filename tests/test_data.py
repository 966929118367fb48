"""Reading, validation, answer-only masking, truncation, batching and length grouping."""

import json
import logging
from pathlib import Path

import pytest
import torch

from medassist import UserError
from medassist.data import (IGNORE_INDEX, InstructionDataModule, LengthGroupedSampler, collate, read_questions,
                            read_records, tokenize_example, tokenize_records)
from medassist.prompts import END_OF_TURN, format_prompt

ROOT = Path(__file__).resolve().parents[1]
GOOD = {"instruction": "What is asthma?", "input": "", "output": "Asthma is a long-term condition of the airways."}


def write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


@pytest.mark.parametrize("line, expected", [
    ('{"instruction": "x", "output": ', "2: not valid JSON"),
    ('["instruction", "output"]', "2: expected a JSON object, got list"),
    ('{"output": "an answer"}', "2: missing 'instruction'"),
    ('{"instruction": "q", "output": "   "}', "2: 'output' is empty"),
    ('{"instruction": 5, "output": "a"}', "2: 'instruction' must be a string, got int"),
    ('{"instruction": "q", "input": ["x"], "output": "a"}', "2: 'input' must be a string, got list"),
])
def test_bad_line_names_file_and_line(tmp_path, line, expected):
    path = write(tmp_path / "train.jsonl", [GOOD, line, GOOD])
    with pytest.raises(UserError, match=f"{path}:{expected}"):
        read_records(path)


def test_all_bad_lines_reported_at_once(tmp_path):
    path = write(tmp_path / "t.jsonl", ["{", GOOD, '{"instruction": "q"}', "nope"])
    with pytest.raises(UserError) as e:
        read_records(path)
    assert "3 bad line(s)" in str(e.value)
    assert all(f"{path}:{n}:" in str(e.value) for n in (1, 3, 4))


def test_missing_empty_and_non_utf8_files(tmp_path):
    with pytest.raises(UserError, match="file not found"):
        read_records(tmp_path / "absent.jsonl")
    with pytest.raises(UserError, match="no records"):
        read_records(write(tmp_path / "empty.jsonl", ["", "  "]))
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(json.dumps(GOOD).encode() + b"\n" + '{"instruction": "caf\xe9", "output": "x"}'.encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1.jsonl:2: not valid UTF-8 \(byte 0xe9\)"):
        read_records(bad)


def test_records_keep_extra_fields_and_skip_blank_lines(tmp_path):
    records = read_records(write(tmp_path / "t.jsonl", [dict(GOOD, focus="asthma"), "", GOOD]))
    assert len(records) == 2 and records[0]["focus"] == "asthma"


def test_masking_covers_prompt_and_keeps_end_of_turn(tiny_tokenizer):
    example = tokenize_example(tiny_tokenizer, {"instruction": "What is asthma?", "input": "I am 30.",
                                                "output": "A condition of the airways."}, 256)
    ids, labels = example["input_ids"], example["labels"]
    prompt = tiny_tokenizer(format_prompt("What is asthma?", "I am 30."), add_special_tokens=False)["input_ids"]
    n_prompt = len(prompt) + 1  # + bos
    assert ids[0] == tiny_tokenizer.bos_token_id and ids[1:n_prompt] == prompt
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]  # unshifted: the model shifts once
    assert labels[-1] == tiny_tokenizer.convert_tokens_to_ids(END_OF_TURN)
    assert tiny_tokenizer.decode(ids[n_prompt:-1]) == "A condition of the airways."
    assert not example["truncated"]


def test_truncation_shortens_the_question_first(tiny_tokenizer):
    long_question = "Tell me about the airways and the lungs. " * 40
    example = tokenize_example(tiny_tokenizer, {"instruction": long_question, "output": "Short answer."}, 64)
    assert example["truncated"] and len(example["input_ids"]) == 64
    answer = tiny_tokenizer("Short answer.", add_special_tokens=False)["input_ids"]
    supervised = [t for t in example["labels"] if t != IGNORE_INDEX]
    assert supervised == answer + [tiny_tokenizer.convert_tokens_to_ids(END_OF_TURN)]  # the whole answer kept
    text = tiny_tokenizer.decode(example["input_ids"])
    assert text.startswith("<bos><start_of_turn>user\n") and "<end_of_turn>\n<start_of_turn>model\n" in text


def test_truncated_answer_loses_its_end_of_turn(tiny_tokenizer):
    example = tokenize_example(tiny_tokenizer, {"instruction": "Why?", "output": "Because of the lungs. " * 50}, 48)
    assert len(example["input_ids"]) == 48
    assert example["labels"][-1] != tiny_tokenizer.convert_tokens_to_ids(END_OF_TURN)
    assert example["labels"].count(IGNORE_INDEX) < 24  # the short prompt was not cut


def test_truncation_is_counted(tiny_tokenizer, caplog):
    records = [GOOD, {"instruction": "x " * 200, "output": "y"}, {"instruction": "q", "output": "z " * 300}]
    with caplog.at_level(logging.WARNING):
        dataset = tokenize_records(tiny_tokenizer, records, 64, "train.jsonl")
    assert "2 of 3 examples longer than max_seq_length=64 were truncated" in caplog.text
    assert max(dataset["length"]) == 64 and min(dataset["supervised"]) >= 1


def test_collate_pads_ids_mask_and_labels_each_with_their_own_value():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}],
                    pad_id=0, pad_to_multiple_of=4)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100], [8, -100, -100, -100]]


def test_length_grouped_sampler_is_a_seeded_permutation_with_little_padding():
    lengths = [(i * 37) % 200 + 1 for i in range(256)]
    sampler = LengthGroupedSampler(lengths, batch_size=8, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(256)) and list(sampler) == first
    sampler.set_epoch(1)
    assert list(sampler) != first

    def padding(order):
        return sum(8 * max(lengths[i] for i in order[k:k + 8]) - sum(lengths[i] for i in order[k:k + 8])
                   for k in range(0, len(order), 8))

    shuffled = torch.randperm(256, generator=torch.Generator().manual_seed(0)).tolist()
    assert padding(first) < padding(shuffled) / 4


def test_datamodule_rejects_bad_data_before_loading_a_model(tmp_path):
    bad = write(tmp_path / "train.jsonl", [GOOD, '{"instruction": "q", "output": 3}'])
    with pytest.raises(UserError, match="train.jsonl:2: 'output' must be a string"):
        InstructionDataModule(base_model="/nonexistent/model", train_file=str(bad), val_file=str(bad))


def test_a_bad_test_file_is_rejected_with_the_others_before_loading_a_model(tmp_path):
    good = write(tmp_path / "train.jsonl", [GOOD])
    bad = write(tmp_path / "test.jsonl", [GOOD, '{"instruction": "q"}'])
    with pytest.raises(UserError, match="test.jsonl:2: missing 'output'"):
        InstructionDataModule(base_model="/nonexistent/model", train_file=str(good), val_file=str(good),
                              test_file=str(bad))


def test_the_sampler_groups_whole_accumulated_steps(tiny_model_dir, tmp_path):
    """Batch 2 accumulated twice reads, step by step, the examples batch 4 reads: the same optimizer steps."""
    from types import SimpleNamespace

    lines = (ROOT / "data" / "train.jsonl").read_text().splitlines()[:24]
    train = write(tmp_path / "train.jsonl", lines)
    orders = []
    for batch_size, accumulate in ((4, 1), (2, 2)):
        data = InstructionDataModule(base_model=str(tiny_model_dir), train_file=str(train), val_file=str(train),
                                     batch_size=batch_size)
        data.trainer = SimpleNamespace(world_size=1, global_rank=0, accumulate_grad_batches=accumulate)
        data.setup("fit")
        orders.append(list(data.train_dataloader().sampler))
    assert orders[0] == orders[1] and sorted(orders[0]) == list(range(24))


def test_read_questions_keeps_good_lines_and_reports_bad_ones(tmp_path):
    path = write(tmp_path / "q.jsonl", [{"question": "What is flu?"}, "{oops", {"instruction": "Why sleep?"},
                                        {"question": ""}])
    items = read_questions(path)
    assert [i.get("question") for i in items] == ["What is flu?", None, "Why sleep?", None]
    assert items[1]["error"].startswith(f"{path}:2: not valid JSON")
    assert items[3]["error"] == f"{path}:4: needs a non-empty string 'question' (or a conversation: 'messages')"


def test_read_questions_takes_conversations_that_end_with_the_question(tmp_path):
    turns = [{"role": "user", "content": "What is asthma?"}, {"role": "assistant", "content": "A lung condition."},
             {"role": "user", "content": "And in children?"}]
    path = write(tmp_path / "q.jsonl", [{"messages": turns, "id": "c1"}, {"messages": turns[:2]}])
    good, bad = read_questions(path)
    assert good == {"line": 1, "question": turns, "id": "c1"}
    assert bad["error"] == (f"{path}:2: the conversation ends with an assistant turn; it must end with the question to "
                            f"answer (a user turn)")


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


CHAT = {"messages": [{"role": "system", "content": "Answer simply."}, u("What is asthma?"),
                     a("Asthma is a condition of the airways."), u("And in children?"),
                     a("Children get it too, often with allergies."), u("Is it contagious?"), a("No, it is not.")]}


@pytest.mark.parametrize("messages, expected", [
    ([u("q"), {"role": "doctor", "content": "a"}], "message 2 has role 'doctor'; use one of system, user, assistant"),
    ([u("q"), a("  ")], "message 2 \\(assistant\\) has empty or non-string 'content'"),
    ([u("q"), u("again"), a("a")], "message 2 is a second user turn in a row; user and assistant turns must alternate"),
    ([u("q"), a("a"), u("and?")],
     "the conversation ends with a user turn; it must end with its answer \\(an assistant turn\\)"),
    ([u("q"), {"role": "system", "content": "s"}, a("a")], "message 2 is a system message after the first turn"),
    ([a("hello"), u("q"), a("a")], "message 1 is an assistant turn; the conversation must start with the user's turn"),
    ([], "'messages' must be a non-empty list"),
])
def test_bad_conversation_names_file_line_and_fix(tmp_path, messages, expected):
    path = write(tmp_path / "train.jsonl", [GOOD, {"messages": messages}])
    with pytest.raises(UserError, match=f"{path}:2: {expected}"):
        read_records(path)


def test_sharegpt_lines_are_sent_to_the_importer(tmp_path):
    turns = [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]
    path = write(tmp_path / "t.jsonl", [{"conversations": turns}])
    with pytest.raises(UserError, match="python -m medassist import sharegpt"):
        read_records(path)


def test_every_assistant_turn_is_supervised_and_nothing_else(tiny_tokenizer):
    example = tokenize_example(tiny_tokenizer, CHAT, 512)
    ids, labels = example["input_ids"], example["labels"]
    supervised = [i for i, t in enumerate(labels) if t != IGNORE_INDEX]
    assert all(labels[i] == ids[i] for i in supervised)
    # the supervised positions are exactly the three answers, each with its <end_of_turn>
    spans, start = [], None
    for i in range(len(ids) + 1):
        on = i < len(ids) and labels[i] != IGNORE_INDEX
        if on and start is None:
            start = i
        if not on and start is not None:
            spans.append(tiny_tokenizer.decode(ids[start:i]))
            start = None
    assert spans == ["Asthma is a condition of the airways.<end_of_turn>",
                     "Children get it too, often with allergies.<end_of_turn>", "No, it is not.<end_of_turn>"]
    masked = tiny_tokenizer.decode([t for t, lab in zip(ids, labels) if lab == IGNORE_INDEX])
    assert masked.count("<start_of_turn>user") == 3 and "Answer simply.\n\nWhat is asthma?" in masked
    # follow-up marks: the second and third answers, not the first
    followed = tiny_tokenizer.decode([t for t, f in zip(ids, example["followup"]) if f])
    assert followed == "Children get it too, often with allergies.<end_of_turn>No, it is not.<end_of_turn>"


def test_last_assistant_only_supervises_the_last_answer(tiny_tokenizer):
    example = tokenize_example(tiny_tokenizer, CHAT, 512, train_on="last_assistant")
    answer = tiny_tokenizer.decode([t for t in example["labels"] if t != IGNORE_INDEX])
    assert answer == "No, it is not.<end_of_turn>"
    with pytest.raises(UserError, match="train_on must be one of all_assistant, last_assistant"):
        tokenize_records(tiny_tokenizer, [CHAT], 512, train_on="all")


def test_a_pair_and_its_one_turn_conversation_tokenize_the_same(tiny_tokenizer):
    pair = tokenize_example(tiny_tokenizer, {"instruction": "What is asthma?", "input": "I am 30.", "output": "A."}, 64)
    chat = tokenize_example(tiny_tokenizer, {"messages": [u("What is asthma?\n\nI am 30."), a("A.")]}, 64)
    assert pair == chat and not any(pair["followup"])


def test_too_long_conversation_drops_oldest_exchanges_keeping_system_and_last(tiny_tokenizer, caplog):
    full = tokenize_example(tiny_tokenizer, CHAT, 512)
    last = tokenize_example(tiny_tokenizer, {"messages": [CHAT["messages"][0], *CHAT["messages"][-2:]]}, 512)
    budget = len(last["input_ids"]) + 4  # room for the last exchange only
    assert len(full["input_ids"]) > budget
    example = tokenize_example(tiny_tokenizer, CHAT, budget)
    assert example["dropped"] == 2 and not example["truncated"] and example["input_ids"] == last["input_ids"]
    text = tiny_tokenizer.decode(example["input_ids"])
    assert text.startswith("<bos><start_of_turn>user\nAnswer simply.\n\nIs it contagious?") and "airways" not in text
    assert all(example["followup"][i] for i, t in enumerate(example["labels"]) if t != IGNORE_INDEX)  # still a follow-up
    with caplog.at_level(logging.WARNING):
        tokenize_records(tiny_tokenizer, [CHAT, GOOD], budget, "chats.jsonl")
    assert "chats.jsonl: 1 of 2 conversations longer than max_seq_length" in caplog.text
    assert "lost their 2 oldest exchange(s)" in caplog.text
    # a budget below even the last exchange: then the single-pair rule cuts the prompt, then the answer's tail
    tight = tokenize_example(tiny_tokenizer, CHAT, 24)
    assert tight["truncated"] and len(tight["input_ids"]) == 24 and tight["dropped"] == 2


def test_data_module_reads_conversations_and_validation_keeps_follow_up_marks(tmp_path, tiny_model_dir):
    train = write(tmp_path / "train.jsonl", [GOOD, CHAT])
    data = InstructionDataModule(base_model=str(tiny_model_dir), train_file=str(train), val_file=str(train),
                                 batch_size=2)
    data.setup("fit")
    batch = next(iter(data.val_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels", "followup"}
    assert batch["followup"].sum() > 0 and not (batch["followup"].bool() & (batch["labels"] == IGNORE_INDEX)).any()
