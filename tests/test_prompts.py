"""The prompt template: the exact prompt text and ids for one example (golden), the derived name, the check."""

import pytest

from medassist import UserError
from medassist.prompts import (EARLIER_NAMES, TEMPLATE_NAME, check_template, encode_conversation, encode_prompt,
                               encode_turns, format_conversation, format_prompt, prompt_tail_length, same_template,
                               stop_ids)

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
    # names before conversations and before retrieved passages: adapters saved under them still load (the prompts
    # of the parts they covered are unchanged)
    assert set(EARLIER_NAMES) == {"gemma-turn-v1", "gemma-turn-ef029d2e", "gemma-turn-45311caf"}
    assert all(same_template(name) for name in EARLIER_NAMES) and TEMPLATE_NAME.removeprefix("gemma-turn-") not in (
        "ef029d2e", "45311caf")  # the conversation and context strings are part of the name now
    with pytest.raises(UserError, match=r"x was trained with prompt template 'alpaca-v0'; .* Do this"):
        check_template("alpaca-v0", "x", "Do this")
    monkeypatch.setattr(prompts, "END_OF_TURN", "<eot>")  # what an edit of the strings does to the digest
    monkeypatch.setattr(prompts, "PROMPT_TAIL", "<eot>\n<start_of_turn>model\n")
    assert prompts._digest() != TEMPLATE_NAME.removeprefix("gemma-turn-")
    assert not same_template("gemma-turn-v1")  # v1 named the old strings: refused once they change
    assert not same_template("gemma-turn-ef029d2e")


def test_each_part_of_the_name_follows_its_own_strings(monkeypatch):
    from medassist import prompts

    monkeypatch.setattr(prompts, "SOURCE_HEAD", "From: ")  # only prompts with retrieved passages render it
    assert prompts._digest() != TEMPLATE_NAME.removeprefix("gemma-turn-")
    assert same_template("gemma-turn-45311caf") and same_template("gemma-turn-ef029d2e")
    monkeypatch.setattr(prompts, "SYSTEM_GAP", "\n")  # only conversations render it
    assert not same_template("gemma-turn-45311caf") and same_template("gemma-turn-ef029d2e")


CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is asthma?"},
                {"role": "assistant", "content": " Asthma is a lung condition. "},
                {"role": "user", "content": "And in children?"}]
GOLDEN_CONVERSATION = ("<start_of_turn>user\nBe brief.\n\nWhat is asthma?<end_of_turn>\n<start_of_turn>model\n"
                       "Asthma is a lung condition.<end_of_turn>\n<start_of_turn>user\nAnd in children?<end_of_turn>\n"
                       "<start_of_turn>model\n")


def test_golden_conversation_text_system_folded_into_the_first_user_turn(tiny_tokenizer):
    assert format_conversation(CONVERSATION) == GOLDEN_CONVERSATION
    ids = encode_conversation(tiny_tokenizer, CONVERSATION)
    assert ids[0] == tiny_tokenizer.bos_token_id and tiny_tokenizer.decode(ids[1:]) == GOLDEN_CONVERSATION
    # one question is a one-turn conversation: the same ids as encode_prompt
    assert encode_conversation(tiny_tokenizer, CONVERSATION[1:2]) == encode_prompt(tiny_tokenizer, "What is asthma?")


def test_turns_are_what_training_labels_and_answering_concatenates(tiny_tokenizer):
    turns = encode_turns(tiny_tokenizer, CONVERSATION + [{"role": "assistant", "content": "It is common."}])
    assert [role for role, _ in turns] == ["user", "assistant", "user", "assistant"]
    end = tiny_tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert all(ids[-1] == end for role, ids in turns if role == "assistant")
    assert tiny_tokenizer.decode(turns[1][1]) == "Asthma is a lung condition.<end_of_turn>"
    prompt = [i for _, ids in turns[:3] for i in ids]
    assert prompt == encode_conversation(tiny_tokenizer, CONVERSATION)  # the prompt of the last answer, exactly
