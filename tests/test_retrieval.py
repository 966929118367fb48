"""Retrieval: the index (build, load, determinism, bad input), search, grounded prompts and records with sources,
grounded training data, the evaluator's side-by-side report and the server's sources."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from medassist import UserError, retrieval, safety
from medassist.index import build, main, split_passages
from medassist.retrieval import doc_of

COLLECTION = [
    {"instruction": "What is asthma?", "output": "Asthma is a long-term condition of the airways. The airways "
     "swell and narrow, which makes breathing hard. Inhalers help.", "source": "NHLBI", "focus": "Asthma",
     "url": "https://example.org/asthma"},
    {"instruction": "What are the symptoms of Lyme disease?", "output": "Lyme disease often starts with a red rash "
     "that spreads from the tick bite, with fever, tiredness and aching joints.", "source": "CDC",
     "focus": "Lyme disease", "url": "https://example.org/lyme"},
    {"instruction": "How does the flu spread?", "output": "The flu spreads through droplets when infected people "
     "cough, sneeze or talk.", "source": "CDC", "focus": "Influenza", "url": "https://example.org/flu"},
    {"instruction": "How is gout treated?", "output": "Gout attacks are treated with medicines that ease the "
     "swelling; diet and fewer sugary drinks help prevent attacks.", "source": "NIAMS", "focus": "Gout",
     "url": "https://example.org/gout"},
]


def write(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("index")
    build([str(write(tmp / "collection.jsonl", COLLECTION))], tmp / "index", threshold=1.0)
    return tmp / "index"


def test_the_right_passage_comes_first_and_the_index_round_trips(index_dir):
    index = retrieval.load(index_dir)
    hits = index.search(["what does lyme disease look like", "can gout be treated?", "how do you catch flu"], k=2)
    assert [h[0]["focus"] for h in hits] == ["Lyme disease", "Gout", "Influenza"]
    assert hits[0][0]["url"] == "https://example.org/lyme" and hits[0][0]["score"] > hits[0][1]["score"]
    assert index.meta["passages"] == 4 and index.meta["documents"] == 4


def test_building_twice_gives_the_same_bytes(index_dir, tmp_path):
    # in another process with another hash seed: a vocabulary in set order would differ between the two
    collection = write(tmp_path / "collection.jsonl", COLLECTION)
    result = subprocess.run([sys.executable, "-m", "medassist", "index", "build", str(collection), "--out",
                             str(tmp_path / "again"), "--threshold", "1.0"], capture_output=True, text=True,
                            env={**os.environ, "PYTHONHASHSEED": "12345"}, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    files = sorted(p.name for p in index_dir.iterdir())
    assert files == sorted(p.name for p in (tmp_path / "again").iterdir())
    for name in files:
        if name != "medassist-index.json":  # it names the source file's path
            assert (index_dir / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name


def test_passages_stay_under_the_word_budget_and_keep_every_word():
    text = "\n".join(f"Sentence number {i} says a few more words here." for i in range(40))
    pieces = split_passages(text, 30)
    assert all(len(p.split()) <= 30 for p in pieces) and len(pieces) > 1
    assert " ".join(pieces).split() == text.split()


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    convo = write(tmp_path / "chats.jsonl", [{"messages": [{"role": "user", "content": "q"},
                                                           {"role": "assistant", "content": "a"}]}])
    with pytest.raises(UserError, match="no question/answer pairs in .*conversations are skipped"):
        build([str(convo)], tmp_path / "out")
    with pytest.raises(UserError, match="file not found"):
        build([str(tmp_path / "absent.jsonl")], tmp_path / "out")
    bad = write(tmp_path / "bad.jsonl", [COLLECTION[0], {"instruction": "q"}])
    with pytest.raises(UserError, match="bad.jsonl:2: missing 'output'"):
        build([str(bad)], tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written
    with pytest.raises(UserError, match="not a medassist index"):
        retrieval.load(tmp_path)
    good = write(tmp_path / "good.jsonl", COLLECTION)
    assert main(["build", str(good), "--out", str(tmp_path / "idx")]) == 0
    with pytest.raises(UserError, match="already exists and is not empty; pass --overwrite"):
        main(["build", str(good), "--out", str(tmp_path / "idx")])


def test_grounding_puts_relevant_passages_in_the_last_user_turn_only(index_dir):
    index = retrieval.load(index_dir)
    chat = [{"role": "user", "content": "What is gout?"}, {"role": "assistant", "content": "A kind of arthritis."},
            {"role": "user", "content": "how is it treated?"}]  # the topic is in the turn before
    (grounded, sources), (alone, none) = retrieval.ground(index, [chat, [{"role": "user", "content": "zzz qqq"}]])
    assert grounded[:2] == chat[:2] and sources[0]["url"] == "https://example.org/gout"
    assert grounded[-1]["content"].startswith("how is it treated?\n\nSource: How is gout treated?\nGout attacks")
    assert alone == [{"role": "user", "content": "zzz qqq"}] and none == []  # nothing relevant: no passage
    assert safety.sources_text(sources) == "Source: How is gout treated? (NIAMS, https://example.org/gout)"
    assert safety.sources_text([]) == safety.NO_SOURCE_LINE


def test_records_with_sources_and_below_the_threshold(index_dir, adapter):
    from medassist.generate import Assistant, Sampling

    index = retrieval.load(index_dir)
    assistant = Assistant(adapter, sampling=Sampling(max_new_tokens=6), index=index)
    lyme, nothing, urgent = assistant.answer_batch(["What are the signs of Lyme disease?",
                                                    "What is a healthy breakfast?",
                                                    "I have crushing chest pain and I'm sweating right now"])
    assert [s["url"] for s in lyme["sources"]] == ["https://example.org/lyme"]
    assert lyme["answer"].endswith("Source: What are the symptoms of Lyme disease? (CDC, https://example.org/lyme)")
    assert nothing["sources"] == [] and nothing["answer"].endswith(safety.NO_SOURCE_LINE)
    assert "sources" not in urgent and urgent["answer"].startswith(safety.EMERGENCY_LINE)  # fixed text only
    streamed = list(assistant.stream("What are the signs of Lyme disease?"))
    assert "".join(p for p in streamed if isinstance(p, str)) == safety.render(streamed[-1])
    assert streamed[-1]["sources"] == lyme["sources"]
    plain = Assistant(adapter, sampling=Sampling(max_new_tokens=6)).answer("What are the signs of Lyme disease?")
    assert "sources" not in plain and "Source:" not in plain["answer"]


def test_grounded_training_data_leaves_the_own_document_out_for_a_share(index_dir, tmp_path):
    from medassist.data import with_context

    pairs = [dict(r, instruction=r["instruction"]) for r in COLLECTION]
    kept = with_context(pairs, retrieval.load(index_dir), "collection.jsonl", leave_out=0.0)
    assert all(r["input"].startswith(f"Source: {r['instruction']}\n") for r in kept)  # its own passage
    assert [r["output"] for r in kept] == [r["output"] for r in COLLECTION]  # its passage is all of its answer
    left = with_context(pairs, retrieval.load(index_dir), "collection.jsonl", leave_out=1.0)
    assert all(not r.get("input", "").startswith(f"Source: {r['instruction']}\n") for r in left)  # never its own
    # another document's passage: the answer says so and restates it, instead of the reference from memory
    assert all(r["output"].startswith("The source I found answers another question") for r in left if "input" in r)
    assert doc_of(COLLECTION[0], "x.jsonl") == "https://example.org/asthma"


def test_respelled_questions_keep_their_words_and_their_answers(index_dir):
    from medassist.data import respelled, with_context

    pairs = [dict(r) for r in COLLECTION]
    plain = with_context(pairs, retrieval.load(index_dir), "collection.jsonl")
    respelt = with_context(pairs, retrieval.load(index_dir), "collection.jsonl", respell=1.0)
    assert [r["output"] for r in respelt] == [r["output"] for r in plain]  # decided on the question as written
    assert [r["input"] for r in respelt] == [r["input"] for r in plain]
    words = lambda q: q.lower().replace("(are) ", "").rstrip(" ?").split()
    assert all(words(a["instruction"]) == words(b["instruction"]) for a, b in zip(respelt, plain))
    rng = __import__("random").Random(3)
    spellings = {respelled("What is (are) Gout ?", rng) for _ in range(200)}
    assert {"What is (are) Gout ?", "What is Gout?", "what is gout?", "What is (are) Gout"} <= spellings


def test_a_passage_teaches_restating_it_or_saying_it_answers_another_question():
    from medassist.data import grounded_output

    question = {"instruction": "What are the symptoms of gout?", "output": "Gout causes sudden pain.\nAnd swelling."}
    whole = {"title": "What are the symptoms of gout ?", "text": "Gout causes sudden pain. And swelling."}
    assert grounded_output(question, whole) == question["output"]  # its own answer, line breaks kept
    part = {"title": "What are the symptoms of gout?", "text": "Gout causes sudden pain."}
    assert grounded_output(question, part) == "Gout causes sudden pain."  # no more than the passage says
    other = {"title": "What is gout?", "text": "Gout is a kind of arthritis. Uric acid builds up. It forms crystals."}
    assert grounded_output(question, other) == ('The source I found answers another question ("What is gout?"), '
                                                'not this one. It says: Gout is a kind of arthritis. Uric acid '
                                                'builds up.')


def test_the_passage_whose_heading_is_the_question_comes_first(tmp_path):
    # BM25 alone prefers the overview, which repeats "gout" and "symptoms"; the heading decides between them
    overview = {"instruction": "What is gout?", "output": "Gout is arthritis. Gout symptoms: gout attacks, gout "
                "symptoms at night, symptoms of gout in the toe.", "url": "https://example.org/gout"}
    symptoms = {"instruction": "What are the symptoms of gout?", "output": "Sudden pain and redness in a joint, "
                "often the big toe.", "url": "https://example.org/gout"}
    build([str(write(tmp_path / "gout.jsonl", [overview, symptoms, *COLLECTION]))], tmp_path / "index")
    index = retrieval.load(tmp_path / "index")
    question = "What are the symptoms of gout?"
    ids, _ = index.bm25.retrieve(retrieval.tokenize([question]), k=1, show_progress=False)
    assert index.passages[int(ids[0][0])]["title"] == "What is gout?"  # what BM25 alone puts first
    assert index.search([question], k=1)[0][0]["title"] == question
    assert retrieval.title_match(question, "What are the symptoms of Gout ?") == 1.0
    assert retrieval.title_match(question, "What is gout?") == 2 / 3  # {what, symptom, gout} vs {what, gout}


def test_the_evaluator_reports_with_and_without_retrieval(index_dir, adapter, tiny_model_dir, tmp_path):
    from medassist.commands import main as medassist

    data = write(tmp_path / "val.jsonl", COLLECTION)
    out = tmp_path / "report.json"
    assert medassist(["evaluate", "--adapter", str(adapter), "--base-model", str(tiny_model_dir), "--data",
                      str(data), "--index", str(index_dir), "--max-new-tokens", "6", "--quantization", "none",
                      "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["retrieval"]["top1_accuracy"] == 1.0 and report["retrieval"]["questions"] == 4
    tuned = report["results"]["fine-tuned"]
    assert "rougeL" in tuned and "rougeL" in tuned["with_retrieval"]
    assert tuned["with_retrieval"]["with_source"] == 4
    assert all(a["sources"] for a in tuned["with_retrieval"]["answers"])


def test_groundedness_counts_sentences_supported_by_the_passage():
    from medassist.evaluate import groundedness

    passage = "Gout attacks are treated with medicines that ease the swelling."
    answer = "Gout attacks are treated with medicines. Unicorns gallop across rainbows daily.\n\nSource: x"
    assert groundedness(answer, [passage]) == 0.5
    assert groundedness(safety.DECIDE_LINE, [passage]) is None  # code-added lines are not the answer


def test_the_server_returns_sources(index_dir, adapter):
    from fastapi.testclient import TestClient

    from medassist.generate import load_for_generation
    from medassist.serve import create_app

    model, tokenizer, name = load_for_generation(str(adapter))
    app = create_app(model, tokenizer, name, str(adapter), index=retrieval.load(index_dir))
    with TestClient(app) as client:
        reply = client.post("/v1/chat/completions", json={"max_tokens": 4, "messages": [
            {"role": "user", "content": "How does the flu spread?"}]}).json()
    assert [s["url"] for s in reply["medassist"]["sources"]] == ["https://example.org/flu"]
    assert reply["choices"][0]["message"]["content"].endswith(safety.DISCLAIMER)
    content = reply["choices"][0]["message"]["content"]
    assert "Source: How does the flu spread? (CDC, https://example.org/flu)" in content


def test_calibration_sets_the_threshold_from_questions_that_find_their_own_document(tmp_path):
    collection = write(tmp_path / "c.jsonl", COLLECTION)
    questions = write(tmp_path / "q.jsonl", [dict(r, instruction=q) for r, q in zip(
        COLLECTION, ["asthma airways", "lyme disease rash", "flu droplets", "gout treated"])])
    meta = build([str(collection)], tmp_path / "idx", calibrate=str(questions))
    assert meta["calibration"]["top1_right"] == 4 and meta["threshold"] > 0
    index = retrieval.load(tmp_path / "idx")
    scores = sorted(h[0]["score"] for h in index.search(["asthma airways", "lyme disease rash", "flu droplets",
                                                          "gout treated"], k=1))
    assert meta["threshold"] == pytest.approx(scores[0], abs=1e-3)  # keeps 95%: of 4, all but none


def test_a_new_topic_retrieves_for_itself_and_a_follow_up_with_the_turn_before(index_dir):
    index = retrieval.load(index_dir)
    gout = [{"role": "user", "content": "What is gout?"}, {"role": "assistant", "content": "A kind of arthritis."}]
    switched = gout + [{"role": "user", "content": "how does the flu spread?"}]
    follow = gout + [{"role": "user", "content": "and what helps?"}]
    new_topic, follow_up = retrieval.relevant_passages(index, [switched, follow])
    assert new_topic[0]["focus"] == "Influenza" and follow_up[0]["focus"] == "Gout"


def test_a_passage_that_does_not_fit_the_context_is_left_out_not_an_error(index_dir, adapter, monkeypatch):
    from medassist import generate
    from medassist.generate import Assistant, Sampling, prompt_ids

    assistant = Assistant(adapter, sampling=Sampling(max_new_tokens=4), index=retrieval.load(index_dir))
    question = "What are the symptoms of Lyme disease?"
    room = len(prompt_ids(assistant.tokenizer, question, 10_000, 0)) + 4 + 2  # the question fits, a passage not
    monkeypatch.setattr(generate, "context_length", lambda model: room)
    record = assistant.answer(question)
    assert record["sources"] == [] and record["answer"].endswith(safety.NO_SOURCE_LINE)
    streamed = list(assistant.stream(question))
    assert streamed[-1]["sources"] == [] and "".join(p for p in streamed if isinstance(p, str)) == safety.render(
        streamed[-1])


def test_an_answer_given_no_passage_never_says_it_found_one():
    from medassist import safety
    from medassist.generate import false_claims

    text = ('The source I found answers another question ("What is gout?"), not this one. It says: Gout is a kind '
            'of arthritis. It builds up in joints.\n\nResting the joint helps.')
    screening = safety.screen_question("What causes gout?")
    source = [{"title": "What is gout?", "source": "", "url": "", "score": 9.0}]
    assert safety.compose(screening, text, false_claims(source))["answer"] == text  # it was given that passage
    for sources in ([], None):  # nothing relevant retrieved, or no index at all
        # the claim's paragraph goes whole: what "it says" was said by no passage
        assert safety.compose(screening, text, false_claims(sources))["answer"] == "Resting the joint helps."
        guard = safety.stream_guard(screening, false_claims(sources))
        words = text.split(" ")
        streamed = [guard.feed(w + " ") for w in words[:-1]] + [guard.feed(words[-1]), guard.close()]
        assert "".join(streamed).strip() == "Resting the joint helps."  # while streaming too, sentence by sentence
