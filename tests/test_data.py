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
    assert items[3]["error"] == f"{path}:4: needs a non-empty string 'question'"
