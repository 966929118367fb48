"""Importers (MedQuAD XML, Alpaca JSON/JSONL, PubMedQA, ShareGPT), topic splits, duplicates, atomic writes, and the checker."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from medassist import UserError
from medassist.data import InstructionDataModule
from medassist.checks import cross_file_warnings, normalise
from medassist.dataprep import deduplicate, main, split_by_topic

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
MEDQUAD_XML = SHARED / "medquad-xml"
needs_sample = pytest.mark.skipif(not MEDQUAD_XML.is_dir(), reason=f"MedQuAD XML sample not found at {MEDQUAD_XML}")
KEYS = ["instruction", "input", "output", "source", "qtype", "focus", "url", "id"]


def run(*argv):
    """main() in-process: its exit status (read stdout and stderr with capsys)."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    return e.value.code or 0


def lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


# ---- MedQuAD ------------------------------------------------------------------------------------------------------
@needs_sample
def test_medquad_sample_matches_the_converted_collection(tmp_path, capsys):
    assert run("import", "medquad", MEDQUAD_XML, "--out", tmp_path / "mq") == 0
    out = capsys.readouterr().out
    assert "skipped 40: no answer (MPlusHerbsSupplements)" in out and "duplicates dropped: 0 exact, 0 near" in out
    records = [r for name in ("train", "validation", "test") for r in lines(tmp_path / "mq" / f"{name}.jsonl")]
    assert len(records) == 270 and all(list(r) == KEYS for r in records)
    converted = {(r["source"], r["id"]): r for name in ("train", "validation")
                 for r in lines(SHARED / "medquad" / f"{name}.jsonl") if r["source"] == "CDC"}
    same = [r for r in records if (r["source"], r["id"]) in converted]
    assert len(same) > 250 and all(converted[r["source"], r["id"]] == r for r in same)  # byte-for-byte the format
    summary = json.loads((tmp_path / "mq" / "import.json").read_text())
    assert summary["skipped"] == {"no answer (MPlusHerbsSupplements)": 40} and summary["read"] == 310


@needs_sample
def test_medquad_split_keeps_topics_together_and_is_reproducible(tmp_path):
    for out, seed in (("a", 1), ("b", 1), ("c", 2)):
        run("import", "medquad", MEDQUAD_XML / "9_CDC_QA", "--out", tmp_path / out, "--seed", seed,
            "--val-fraction", 0.2, "--test-fraction", 0.2)
    focus = {name: {r["focus"] or r["url"] for r in lines(tmp_path / "a" / f"{name}.jsonl")}  # no focus: the document
             for name in ("train", "validation", "test")}
    assert not (focus["train"] & focus["validation"]) and not (focus["train"] & focus["test"])
    assert not (focus["validation"] & focus["test"])
    assert (tmp_path / "a" / "validation.jsonl").read_text() == (tmp_path / "b" / "validation.jsonl").read_text()
    assert (tmp_path / "a" / "validation.jsonl").read_text() != (tmp_path / "c" / "validation.jsonl").read_text()
    n = len(lines(tmp_path / "a" / "validation.jsonl"))
    assert 0.15 * 265 <= n <= 0.35 * 265


def test_medquad_malformed_xml_names_the_file_and_line_and_writes_nothing(tmp_path, capsys):
    subset = tmp_path / "src" / "1_X_QA"
    subset.mkdir(parents=True)
    write(subset / "0001.xml", '<Document id="1" source="X"><Focus>F</Focus><QAPairs><QAPair>\n'
                               '<Question qid="1-1">Q?</Question>\n<Answer>A.</Answer>\n</QAPair></QAPairs></Document>')
    write(subset / "0002.xml", '<Document id="2">\n<Focus>G</Focus>\n<QAPairs>\n</Document>')
    assert run("import", "medquad", tmp_path / "src", "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert f"{subset / '0002.xml'}:4: malformed XML (mismatched tag" in err and "nothing was written" in err
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["src"]  # no temp dir left


def test_missing_source_and_empty_directory(tmp_path, capsys):
    assert run("import", "medquad", tmp_path / "nope", "--out", tmp_path / "out") == 2
    assert "nope: not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert run("import", "medquad", tmp_path / "empty", "--out", tmp_path / "out") == 2
    assert "no .xml files" in capsys.readouterr().err


# ---- Alpaca ---------------------------------------------------------------------------------------------------------
def qa(i, **extra):
    return {"instruction": "If you are a doctor, answer.", "input": f"Question {i} about topic {i}?",
            "output": f"Answer {i}.", **extra}


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_alpaca_json_and_jsonl_with_duplicates_and_empty_answers(tmp_path, capsys, suffix):
    items = [qa(i) for i in range(20)] + [qa(3), qa(4, output="ANSWER 4!"), qa(5, output="  ")]
    text = json.dumps(items, indent=1) if suffix == ".json" else "\n".join(map(json.dumps, items))
    source = write(tmp_path / f"chat{suffix}", text)
    assert run("import", "alpaca", source, "--out", tmp_path / "out", "--val-fraction", 0.1, "--test-fraction", 0) == 0
    out = capsys.readouterr().out
    assert "skipped 1: empty question or answer" in out and "1 exact, 1 near" in out
    train, val = lines(tmp_path / "out" / "train.jsonl"), lines(tmp_path / "out" / "validation.jsonl")
    assert len(train) + len(val) == 20 and len(val) == 2 and not (tmp_path / "out" / "test.jsonl").exists()
    assert train[0]["source"] == "chat" and train[0]["input"].startswith("Question")


def test_alpaca_custom_field_names(tmp_path):
    source = write(tmp_path / "hcm.jsonl", "\n".join(json.dumps({"q": f"Q{i}?", "a": f"A{i}."}) for i in range(10)))
    assert run("import", "alpaca", source, "--out", tmp_path / "out", "--instruction-field", "q",
               "--output-field", "a", "--input-field", "") == 0
    records = [r for name in ("train", "validation", "test") if (tmp_path / "out" / f"{name}.jsonl").exists()
               for r in lines(tmp_path / "out" / f"{name}.jsonl")]
    assert sorted(r["instruction"] for r in records) == sorted(f"Q{i}?" for i in range(10))


@pytest.mark.parametrize("text, expected", [
    ('{"instruction": "q", "output": "a"}\n{"instruction": "q2", "output": \n', "bad.jsonl:2: not valid JSON"),
    ('[{"instruction": "q", "output": "a"},\n {"instruction": "q2" "output": "b"}]', "bad.json:2: not valid JSON"),
    ('{"question": "q", "output": "a"}', "bad.jsonl:1: no 'instruction' field (it has ['output', 'question']); "
                                         "name the instruction field with --instruction-field"),
    ('{"instruction": "q", "output": 5}', "bad.jsonl:1: 'output' must be a string, got int"),
    ('[1]', "bad.json: item 1: expected a JSON object, got int"),
])
def test_alpaca_bad_files(tmp_path, capsys, text, expected):
    source = write(tmp_path / ("bad.json" if text.startswith("[") else "bad.jsonl"), text)
    assert run("import", "alpaca", source, "--out", tmp_path / "out") == 2
    assert expected in capsys.readouterr().err and not (tmp_path / "out").exists()


# ---- ShareGPT -------------------------------------------------------------------------------------------------------
def chat(i, *extra):
    return {"id": f"c{i}", "conversations": [{"from": "system", "value": "Be kind."},
                                             {"from": "human", "value": f"What is topic {i}?"},
                                             {"from": "gpt", "value": f"Topic {i} is a thing."},
                                             {"from": "human", "value": "And in children?"},
                                             {"from": "gpt", "value": f"Children get topic {i} too."}, *extra]}


def test_sharegpt_becomes_openai_messages_that_fit_reads(tmp_path, capsys):
    from medassist.data import read_records

    items = [chat(i) for i in range(10)] + [chat(10, {"from": "human", "value": "thanks"})]
    source = write(tmp_path / "chats.json", json.dumps(items))
    assert run("import", "sharegpt", source, "--out", tmp_path / "out", "--val-fraction", 0.2, "--test-fraction", 0) == 0
    assert "skipped 1: last human turn without an answer (dropped)" in capsys.readouterr().out
    records = read_records(tmp_path / "out" / "train.jsonl") + read_records(tmp_path / "out" / "validation.jsonl")
    assert len(records) == 11
    c3 = next(r for r in records if r["id"] == "c3")
    assert c3["messages"] == [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "What is topic 3?"},
                              {"role": "assistant", "content": "Topic 3 is a thing."},
                              {"role": "user", "content": "And in children?"},
                              {"role": "assistant", "content": "Children get topic 3 too."}]
    assert next(r for r in records if r["id"] == "c10")["messages"][-1]["role"] == "assistant"


@pytest.mark.parametrize("item, expected", [
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]},
     "chats.jsonl:2: unknown speaker(s) bot in 'from'; expected one of human"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "q2"}, {"from": "gpt", "value": "a"}]},
     "chats.jsonl:2: message 2 is a second user turn in a row"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}]},
     "chats.jsonl:2: message 2 (assistant) has empty or non-string 'content'"),
    ({"messages": []}, "chats.jsonl:2: expected an object with 'conversations'"),
])
def test_sharegpt_bad_lines_name_the_line_and_write_nothing(tmp_path, capsys, item, expected):
    source = write(tmp_path / "chats.jsonl", json.dumps(chat(0)) + "\n" + json.dumps(item) + "\n")
    assert run("import", "sharegpt", source, "--out", tmp_path / "out") == 2
    assert expected in capsys.readouterr().err and not (tmp_path / "out").exists()


# ---- PubMedQA -------------------------------------------------------------------------------------------------------
def pqa(i, decision="yes"):
    return {"QUESTION": f"Does drug {i} help?", "CONTEXTS": [f"Background {i}.", f"Results {i}."],
            "LONG_ANSWER": f"Drug {i} helped in this trial.", "final_decision": decision, "MESHES": ["Humans"]}


def test_pubmedqa_answer_leads_with_the_decision_and_keeps_it(tmp_path):
    data = {str(100 + i): pqa(i, ("yes", "no", "maybe")[i % 3]) for i in range(12)}
    source = write(tmp_path / "ori_pqal.json", json.dumps(data, indent=2))
    assert run("import", "pubmedqa", source, "--out", tmp_path / "out", "--test-fraction", 0) == 0
    records = {r["id"]: r for name in ("train", "validation") for r in lines(tmp_path / "out" / f"{name}.jsonl")}
    r = records["101"]
    assert r["output"] == "No. Drug 1 helped in this trial." and r["decision"] == "no"
    assert r["input"] == "Background 1.\nResults 1." and r["url"].endswith("/101/")
    assert run("import", "pubmedqa", source, "--out", tmp_path / "bare", "--no-context") == 0
    assert all(not r["input"] for r in lines(tmp_path / "bare" / "train.jsonl"))


def test_pubmedqa_bad_entry_names_its_line(tmp_path, capsys):
    data = {"1": pqa(1), "2": {**pqa(2), "final_decision": "perhaps"}, "3": {"QUESTION": "q"}}
    source = write(tmp_path / "ori_pqal.json", json.dumps(data, indent=2))
    assert run("import", "pubmedqa", source, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    line = source.read_text().splitlines().index('  "2": {') + 1
    assert "2 problem(s)" in err and f"{source}:{line}: entry 2" in err and "final_decision='perhaps'" in err
    assert "entry 3" in err and "LONG_ANSWER" in err
    assert run("import", "pubmedqa", write(tmp_path / "list.json", "[]"), "--out", tmp_path / "out") == 2


# ---- splitting, duplicates, output directory ----------------------------------------------------------------------
def test_near_duplicates_differ_only_in_case_punctuation_and_spacing():
    assert normalise("What is  (are) Asthma ?") == normalise("what is are asthma") == "what is are asthma"
    a = {"instruction": "What is asthma?", "input": "", "output": "A lung condition."}
    kept, exact, near = deduplicate([("t", a), ("t", dict(a)), ("u", {**a, "output": "a LUNG condition"}),
                                     ("v", {**a, "output": "A lung disease."})])
    assert (len(kept), exact, near) == (2, 1, 1)


def test_split_fractions_are_checked_and_train_is_never_empty():
    pairs = [(f"t{i}", {"i": i}) for i in range(10)]
    with pytest.raises(UserError, match="must be in"):
        split_by_topic(pairs, 0.6, 0.5, seed=0)
    with pytest.raises(UserError, match="only 1 topic"):
        split_by_topic([("same", {"i": i}) for i in range(5)], 0.1, 0.1, seed=0)


def test_existing_output_is_replaced_only_with_overwrite(tmp_path, capsys):
    source = write(tmp_path / "d.jsonl", "\n".join(json.dumps(qa(i)) for i in range(10)))
    out = tmp_path / "out"
    out.mkdir()
    write(out / "old.txt", "x")
    assert run("import", "alpaca", source, "--out", out) == 2
    assert "pass --overwrite" in capsys.readouterr().err and (out / "old.txt").exists()
    assert run("import", "alpaca", source, "--out", out, "--overwrite") == 0
    assert not (out / "old.txt").exists() and (out / "train.jsonl").exists()


# ---- checker --------------------------------------------------------------------------------------------------------
def test_check_reports_each_defect_with_file_and_line(tmp_path, tiny_model_dir, capsys):
    good = [qa(i) for i in range(6)]
    train = write(tmp_path / "train.jsonl", "\n".join(map(json.dumps, good + [qa(2, output="answer 2")])) + "\n"
                  + '{"instruction": "q"}\n\n{"instruction": "q", "output": "  "}\nnot json\n')
    val = write(tmp_path / "validation.jsonl", "\n".join(map(json.dumps, [qa(1), qa(9), qa(4, output="Other.")])))
    code = run("check", train, val, "--base-model", tiny_model_dir, "--max-seq-length", 20)
    out = capsys.readouterr().out
    assert code == 2
    assert f"{train}: 7 examples, 3 bad line(s), 1 duplicate(s)" in out
    assert f"{train}:8: missing 'output'" in out and f"{train}:10: 'output' is empty" in out
    assert f"{train}:11: not valid JSON" in out and f"duplicate: {train}:7 repeats line 3" in out
    assert "tokens: p50" in out and "7 (100.0%) longer than max_seq_length=20" in out
    assert f"{val} vs {train}: 1 shared pair(s), 1 shared question(s) with another answer" in out
    assert f"overlap: {val}:1 is also in {train}" in out


def test_check_clean_files_pass_and_strict_fails_on_overlap(tmp_path, capsys):
    train = write(tmp_path / "train.jsonl", "\n".join(json.dumps(qa(i)) for i in range(5)))
    val = write(tmp_path / "val.jsonl", "\n".join(json.dumps(qa(i)) for i in range(4, 8)))
    assert run("check", train, "--base-model", "none") == 0
    assert run("check", train, val, "--base-model", "none") == 0
    assert run("check", train, val, "--base-model", "none", "--strict") == 2
    assert run("check", tmp_path / "absent.jsonl", "--base-model", "none") == 2
    assert "file not found" in capsys.readouterr().out


def test_fit_data_module_warns_about_duplicates_and_overlap(tmp_path, caplog):
    train = write(tmp_path / "train.jsonl", "\n".join(json.dumps(qa(i)) for i in [0, 1, 1, 2]))
    val = write(tmp_path / "val.jsonl", "\n".join(json.dumps(qa(i)) for i in [2, 3]))
    InstructionDataModule(base_model="/nonexistent", train_file=str(train), val_file=str(val))
    text = caplog.text
    assert f"{train}: 1 duplicate pair(s)" in text and f"{val}: 1 pair(s) also in {train}" in text
    assert cross_file_warnings({"a": [qa(0)], "b": [qa(1)]}) == []


def test_python_m_medassist_data_reaches_the_importer(tmp_path):
    source = write(tmp_path / "d.jsonl", "\n".join(json.dumps(qa(i)) for i in range(10)))
    result = subprocess.run([sys.executable, "-m", "medassist.data", "import", "alpaca", str(source), "--out",
                             str(tmp_path / "out")], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout and (tmp_path / "out" / "train.jsonl").exists()


def test_the_data_module_does_not_import_the_importers():
    """Imports run one way: dataprep uses data, data (what training loads) never loads dataprep."""
    code = "import sys, medassist.data; assert 'medassist.dataprep' not in sys.modules, 'data imports dataprep'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr[-2000:]
