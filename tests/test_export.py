"""`python -m medassist export --format gguf`: the file loads back with transformers (weights within the quantization's
error of the merged model, the same token ids), the Modelfile's template renders our prompt token for token, and
`serve --base-model file.gguf` loads it. On a tiny Gemma 3 shaped the way llama.cpp's Gemma 3 computes (every 6th
layer global, head_dim 256); the embedded gemma-3-270m once, marked slow."""

import json
import re
import shutil
import subprocess

import pytest
import torch

from conftest import make_tiny_model
from medassist.export import LLAMA_CPP_SWA_PATTERN, export, main, modelfile, ollama_template
from medassist.prompts import STOP_TOKENS, TEMPLATE_NAME, encode_conversation, encode_text

CONVERSATION = [{"role": "system", "content": "Answer in one sentence."},
                {"role": "user", "content": "What are the symptoms of asthma in children?"},
                {"role": "assistant", "content": "Wheezing, coughing and shortness of breath."},
                {"role": "user", "content": "Is it treatable?"}]
CONVERSATIONS = [CONVERSATION[1:2], CONVERSATION, CONVERSATION[1:],
                 [{"role": "user", "content": "Flu?"}, {"role": "assistant", "content": "A virus."},
                  {"role": "user", "content": "Cold?"}, {"role": "assistant", "content": "Milder."},
                  {"role": "user", "content": "Covid?"}]]
# Largest logit difference allowed, as a share of the largest logit: f16 rounds each weight by ~5e-4 of itself;
# q8_0 stores blocks of 32 on a scale of max/127 (measured on the tiny model below: 1.0e-3 and 1.9e-2; with its
# global layer on the local RoPE base instead, 6.7e-2 and 6.9e-2).
TOLERANCE = {"f16": 3e-3, "q8_0": 3e-2}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(adapter, merged directory): a tiny Gemma 3 with llama.cpp's layer pattern and head_dim, a random adapter.
    Six layers, so the sixth is global as in the real model: the config transformers reads back from the file is
    checked here with the global layer's RoPE base (1e6; the local layers' 1e4) in use."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from medassist.merge import merge
    from medassist.model import MedAssistLM

    base = make_tiny_model(tmp_path_factory.mktemp("tiny-gguf"))
    config = Gemma3TextConfig.from_pretrained(base)
    config.head_dim = config.query_pre_attn_scalar = 256  # as in every Gemma 3 but 27b; llama.cpp assumes it
    config.num_hidden_layers = LLAMA_CPP_SWA_PATTERN
    config.layer_types = ["sliding_attention"] * (LLAMA_CPP_SWA_PATTERN - 1) + ["full_attention"]
    torch.manual_seed(0)
    Gemma3ForCausalLM(config).save_pretrained(base)
    module = MedAssistLM(base_model=str(base), quantization="none", precision="fp32")
    module.configure_model()
    for name, param in module.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    adapter = module.save_adapter(tmp_path_factory.mktemp("run") / "lora_adapter")
    return adapter, merge(str(adapter), str(tmp_path_factory.mktemp("merged") / "m"), dtype="fp32")


def logits(model, ids):
    with torch.no_grad():
        return model.eval()(input_ids=torch.tensor([ids])).logits[0]


@pytest.fixture(scope="module")
def reference(tiny):
    """(the merged model, its base), loaded once for the module: what every export is compared with."""
    from transformers import AutoModelForCausalLM

    _, merged = tiny
    base = json.loads((merged / "medassist.json").read_text())["base_model"]
    return [AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32) for path in (merged, base)]


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_gguf_loads_back_with_the_merged_logits_and_the_same_tokens(tiny, reference, tmp_path, quant):
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter, merged = tiny
    out = export(str(adapter), str(tmp_path / "medassist.gguf"), quant)
    ids = encode_conversation(AutoTokenizer.from_pretrained(merged), CONVERSATION)
    assert encode_conversation(AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name), CONVERSATION) == ids

    expected, base = (logits(model, ids) for model in reference)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32)
    assert model.config.layer_types[-1] == "full_attention"  # the global layer the fixture has, read from the file
    got = logits(model, ids)
    tolerance = TOLERANCE[quant] * expected.abs().max()
    assert (expected - base).abs().max() > 3 * tolerance  # the adapter's change is far above the rounding
    assert (got - expected).abs().max() < tolerance
    assert (got.argmax(-1) == expected.argmax(-1)).all()

    fields = gguf.GGUFReader(out).fields
    assert fields["medassist.template"].contents() == TEMPLATE_NAME
    assert fields["general.file_type"].contents() == {"f16": 1, "q8_0": 7}[quant]


def test_serve_base_model_gguf_loads_the_export(tiny, reference, tmp_path, monkeypatch):
    """What `serve --base-model exports/medassist.gguf` runs: load_for_generation on the .gguf path."""
    from medassist.generate import load_for_generation

    adapter, _ = tiny
    out = export(str(adapter), str(tmp_path / "exports" / "medassist.gguf"), "f16")
    monkeypatch.setenv("MEDASSIST_CACHE", str(tmp_path / "cache"))  # the converted copy goes here, not ~/.cache
    model, tokenizer, name = load_for_generation(None, str(out), precision="fp32")
    ids = encode_conversation(tokenizer, CONVERSATION)
    expected = logits(reference[0], ids)
    assert name == str(out) and (logits(model, ids) - expected).abs().max() < TOLERANCE["f16"] * expected.abs().max()


# --- the Modelfile: Ollama's Go template, rendered by the subset of text/template it uses -------------------------

def render_go(template: str, values: dict) -> str:
    """Go text/template for what ollama_template emits: text, {{ $v := x }} / {{ $v = x }}, {{ range }}, {{ if }} /
    {{ else if }} / {{ else }} / {{ end }}, fields (.X, $.X), eq / not / and, string literals. No trimming markers."""
    parts = re.split(r"{{(.*?)}}", template, flags=re.S)  # text, action, text, ...
    assert "{{" not in "".join(parts[::2]) and not any(a.startswith("-") or a.endswith("-") for a in parts[1::2])

    def block(i):
        nodes = []
        while i < len(parts):
            piece, action, i = parts[i], i % 2 == 1, i + 1
            s = piece.strip()
            if not action:
                nodes.append(("text", piece))
            elif s == "end" or s.startswith("else"):
                return nodes, i, s
            elif s.startswith(("range ", "if ")):
                body, i, close = block(i)
                branches = [(s.split(" ", 1)[1], body)]
                while s.startswith("if ") and close != "end":
                    cond = close[len("else"):].strip()
                    body, i, close = block(i)
                    branches.append((cond[3:] if cond else "true", body))
                nodes.append((s.split(" ", 1)[0], branches))
            else:
                nodes.append(("action", s))
        return nodes, i, None

    def value(expr, dot, env):
        args = expr.split()
        if len(args) > 1:
            head, *rest = args
            vals = [value(a, dot, env) for a in rest]
            return {"eq": lambda: vals[0] == vals[1], "not": lambda: not vals[0],
                    "and": lambda: next((v for v in vals if not v), vals[-1])}[head]()
        if expr.startswith('"'):
            return json.loads(expr)
        if expr in ("true", "false"):
            return expr == "true"
        if expr.startswith("$."):
            return values[expr[2:]]
        return env[expr] if expr.startswith("$") else dot[expr[1:]]

    def run(nodes, dot, env):
        out = []
        for kind, arg in nodes:
            if kind == "text":
                out.append(arg)
            elif kind == "range":
                (expr, body), = arg
                out += [run(body, item, env) for item in value(expr, dot, env)]
            elif kind == "if":
                taken = next((body for cond, body in arg if value(cond, dot, env)), [])
                out.append(run(taken, dot, env))
            elif m := re.fullmatch(r"(\$\w+) :?= (.+)", arg):
                env[m[1]] = value(m[2], dot, env)
            else:
                out.append(str(value(arg, dot, env)))
        return "".join(out)

    nodes, _, close = block(0)
    assert close is None
    return run(nodes, values, {})


def ollama_values(messages: list[dict]) -> dict:
    """What Ollama passes the template (template.go collate): every message, and the system messages joined."""
    return {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages],
            "System": "\n\n".join(m["content"] for m in messages if m["role"] == "system")}


def test_modelfile_renders_our_prompt_token_for_token(tiny_tokenizer):
    text = modelfile("medassist.gguf")
    template = re.search(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M)[1]
    assert template == ollama_template() and "FROM ./medassist.gguf\n" in text
    assert re.findall(r'^PARAMETER stop (".*")$', text, re.M) == [json.dumps(t) for t in STOP_TOKENS]
    for messages in CONVERSATIONS:
        rendered = render_go(template, ollama_values(messages))
        # llama.cpp and Ollama tokenize the whole prompt after <bos>; medassist tokenizes turn by turn
        ids = encode_text(tiny_tokenizer, rendered, bos=True)
        assert ids == encode_conversation(tiny_tokenizer, messages), rendered


@pytest.mark.skipif(not shutil.which("go"), reason="Go is not installed: the real text/template check is skipped")
def test_the_template_renders_the_same_with_go_text_template(tmp_path):
    from medassist.prompts import format_conversation

    (tmp_path / "main.go").write_text("""package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

func main() {
	var runs []map[string]any
	json.NewDecoder(os.Stdin).Decode(&runs)
	t := template.Must(template.New("").Parse(os.Args[1]))
	out := []string{}
	for _, values := range runs {
		var b strings.Builder
		if err := t.Execute(&b, values); err != nil {
			panic(err)
		}
		out = append(out, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
""")
    result = subprocess.run(["go", "run", str(tmp_path / "main.go"), ollama_template()], capture_output=True,
                            text=True, timeout=120, input=json.dumps([ollama_values(m) for m in CONVERSATIONS]))
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout) == [format_conversation(m) for m in CONVERSATIONS]
    assert [render_go(ollama_template(), ollama_values(m)) for m in CONVERSATIONS] == json.loads(result.stdout)


# --- the command ---------------------------------------------------------------------------------------------------

def test_cli_writes_gguf_modelfile_and_card_and_refuses_bad_input(tiny, tmp_path, capsys):
    adapter, _ = tiny
    out = tmp_path / "exports" / "medassist.gguf"
    assert main(["--adapter", str(tmp_path / "nowhere"), "--out", str(out), "--quant", "q4_k"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a LoRA adapter directory" in err and "--quant must be one of" in err
    assert main(["--adapter", str(adapter), "--out", str(tmp_path / "medassist.bin")]) == 2
    assert "ending in .gguf" in capsys.readouterr().err and not (tmp_path / "exports").exists()

    assert main(["--adapter", str(adapter), "--out", str(out), "--quant", "f16"]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["Modelfile", "README.md", "medassist.gguf"]
    card = (out.parent / "README.md").read_text()
    assert "NOT part of this file" in card and f"python -m medassist serve --base-model {out}" in card
    assert (out.parent / "Modelfile").read_text() == modelfile("medassist.gguf")

    before = out.stat().st_mtime_ns
    assert main(["--adapter", str(adapter), "--out", str(out)]) == 2
    assert "would replace" in capsys.readouterr().err and out.stat().st_mtime_ns == before
    assert main(["--adapter", str(adapter), "--out", str(out), "--force"]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["Modelfile", "README.md", "medassist.gguf"]  # no temp


def test_models_llama_cpp_would_run_differently_are_refused(tiny_model_dir):
    """conftest's tiny model has a global second layer and head_dim 32: llama.cpp would compute it otherwise."""
    from transformers import AutoConfig

    from medassist import UserError
    from medassist.export import check_llama_cpp

    assert LLAMA_CPP_SWA_PATTERN == 6
    with pytest.raises(UserError, match="layer pattern.*query_pre_attn_scalar"):
        check_llama_cpp(AutoConfig.from_pretrained(tiny_model_dir))


@pytest.mark.slow
def test_embedded_gemma_3_270m_round_trips_through_gguf(tmp_path):
    """The real tokenizer (copied from the embedded GGUF) and weights, in f16 (the tiny model covers q8_0's numbers;
    f16 keeps this test to a quarter of the time)."""
    from transformers import AutoModelForCausalLM

    from medassist.export import _tokenizer_fields
    from medassist.loading import _embedded_gguf, load_config, load_tokenizer
    from medassist.model import MedAssistLM

    module = MedAssistLM(base_model="embedded", quantization="none", precision="fp32")
    module.configure_model()
    torch.manual_seed(0)
    for name, param in module.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    adapter = module.save_adapter(tmp_path / "run" / "lora_adapter")
    out = export(str(adapter), str(tmp_path / "medassist.gguf"), "f16")

    # The tokenizer is the embedded file's, field for field: the one load_tokenizer("embedded") is built from
    # (building it again from the export costs transformers a minute of merge reconstruction).
    written, source = _tokenizer_fields(str(out)), _tokenizer_fields(str(_embedded_gguf()))
    assert len(written["tokenizer.ggml.tokens"]) == 262144
    assert written == {k: v for k, v in source.items() if k != "tokenizer.chat_template"}
    ids = encode_conversation(load_tokenizer("embedded"), CONVERSATION)
    # The reference: the adapter unmerged (the merged weights' function, without merging 268M weights again).
    expected = logits(module.model, ids)
    # transformers reads the file's metadata in full twice, for the config and for the weights (25 s here with 262k
    # tokens, 17 s with the config given): the config is given; the tiny model's tests check the one it reads back.
    got = logits(AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, config=load_config("embedded"),
                                                      dtype=torch.float32), ids)
    assert (got - expected).abs().max() < TOLERANCE["f16"] * expected.abs().max()
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9
