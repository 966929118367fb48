"""The prompt template: the exact prompt text and ids for one example (golden), the derived name, the check."""

import pytest

from medassist import UserError
from medassist.prompts import (EARLIER_NAMES, TEMPLATE_NAME, check_template, encode_prompt, format_prompt,
                               prompt_tail_length, same_template, stop_ids)

GOLDEN_TEXT = "<start_of_turn>user\nWhat is asthma?\n\nIn children.<end_of_turn>\n<start_of_turn>model\n"


def test_golden_prompt_text_and_ids(tiny_tokenizer):
    assert format_prompt("  What is asthma? ", " In children. ") == GOLDEN_TEXT
    assert format_prompt("What is asthma?") == "<start_of_turn>user\nWhat is asthma?<end_of_turn>\n<start_of_turn>model\n"
    ids = encode_prompt(tiny_tokenizer, "What is asthma?", "In children.")
    special = {t: tiny_tokenizer.convert_tokens_to_ids(t) for t in ("<bos>", "<start_of_turn>", "<end_of_turn>")}
    assert ids[0] == special["<bos>"] and ids.count(special["<bos>"]) == 1
    assert ids.count(special["<start_of_turn>"]) == 2 and ids.count(special["<end_of_turn>"]) == 1
    assert tiny_tokenizer.decode(ids[1:]) == GOLDEN_TEXT  # the ids are the text, nothing added or lost
    tail = prompt_tail_length(tiny_tokenizer)
    assert tiny_tokenizer.decode(ids[-tail:]) == "<end_of_turn>\n<start_of_turn>model\n"


def test_stop_ids_are_eos_and_the_turn_markers(tiny_tokenizer):
    expected = {tiny_tokenizer.eos_token_id, *(tiny_tokenizer.convert_tokens_to_ids(t)
                                              for t in ("<end_of_turn>", "<start_of_turn>"))}
    assert set(stop_ids(tiny_tokenizer)) == expected and len(expected) == 3


def test_name_is_derived_from_the_strings_and_old_adapters_still_match(monkeypatch):
    from medassist import prompts

    assert TEMPLATE_NAME == f"gemma-turn-{prompts._digest()}"
    assert same_template(TEMPLATE_NAME) and same_template(None) and same_template("gemma-turn-v1")
    assert set(EARLIER_NAMES) == {"gemma-turn-v1"}
    with pytest.raises(UserError, match=r"x was trained with prompt template 'alpaca-v0'; .* Do this"):
        check_template("alpaca-v0", "x", "Do this")
    monkeypatch.setattr(prompts, "END_OF_TURN", "<eot>")  # what an edit of the strings does to the digest
    monkeypatch.setattr(prompts, "PROMPT_TAIL", "<eot>\n<start_of_turn>model\n")
    assert prompts._digest() != TEMPLATE_NAME.removeprefix("gemma-turn-")
    assert not same_template("gemma-turn-v1")  # v1 named the old strings: refused once they change
