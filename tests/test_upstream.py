"""The gateway in front of a serving engine (`serve --upstream`): a real raw engine process (`serve --raw`, the tiny
model) behind a real gateway process, and a stub engine (FastAPI in a thread) for what must be exact: the prompt it
is sent, a dose sentence the guard removes, an engine down (502), slow (504) or left by its client (cancelled)."""

import asyncio
import http.client
import json
import socket
import threading
import time
from urllib.parse import urlsplit

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from fastapi.testclient import TestClient

from medassist import safety
from medassist.prompts import STOP_TOKENS, format_conversation
from medassist.sampling import Sampling
from medassist.serve import create_app
from medassist.upstream import Upstream
from test_serve import EMERGENCY, ROOT, SEEN, call, free_port, start_server, stop_server

DOSE = "Take 800 mg of ibuprofen every 4 hours."
# sampled: the tiny model then writes words (test_serve's stop-string case); same seed, same prompt, same text
FLU = {"messages": [{"role": "user", "content": "What is flu?"}], "temperature": 1.5, "top_p": 1.0, "seed": 1,
       "max_tokens": 30}
STUB_TEXT = ["Asthma is a condition ", "of the airways. ", DOSE, " See a doctor if it gets worse.",
             "<end_of_turn>\n<start_of_turn>user\nmade-up next turn"]  # the marker: ours to cut if the engine does not


# ---- a real raw engine and a real gateway, each a `python -m medassist serve` process ----------------------------
@pytest.fixture(scope="module")
def processes(tiny_model_dir, tmp_path_factory):
    """(engine url, its log, gateway url), started side by side: the gateway names the engine's model, so it starts
    without asking it."""
    logs = tmp_path_factory.mktemp("upstream")
    engine = f"http://127.0.0.1:{free_port()}"
    raw = ["--raw", "--base-model", str(tiny_model_dir), "--max-tokens-limit", "900"]
    gateway = ["--upstream", f"{engine}/v1", "--upstream-model", "medassist", "--base-model", str(tiny_model_dir),
               "--max-tokens-limit", "900"]
    started = {}
    threads = [threading.Thread(target=lambda: started.update(raw=start_server(logs / "raw.log", *raw, port=int(engine.rsplit(":", 1)[1])))),
               threading.Thread(target=lambda: started.update(gateway=start_server(logs / "gateway.log", *gateway)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if len(started) < 2:  # the other one's error is in the output above
        for proc, _ in started.values():
            stop_server(proc)
        pytest.fail("the raw engine or the gateway did not start")
    yield started["raw"][1], logs / "raw.log", started["gateway"][1]
    for proc, _ in started.values():
        stop_server(proc)


@pytest.fixture(scope="module")
def engine(processes):
    return processes[:2]


@pytest.fixture(scope="module")
def gateway(processes):
    return processes[2]


def completions_served(engine_url: str) -> int:
    return json.loads(call(engine_url, "GET", "/health")[2])["completions"]


def test_the_raw_engine_says_it_has_no_safety_layer(engine):
    url, log = engine
    assert "RAW ENGINE" in log.read_text() and "NO safety layer" in log.read_text()
    health = json.loads(call(url, "GET", "/health")[2])
    assert health["raw"] is True and health["safety_layer"] is None
    assert call(url, "POST", "/v1/chat/completions", {"messages": []})[0] == 404  # no chat: nothing to mistake
    body = {"prompt": format_conversation(FLU["messages"]), "stream": True, "max_tokens": 30, "temperature": 1.5,
            "top_p": 1.0, "seed": 1, "repetition_penalty": 1.1, "stop": " can"}  # the gateway's FLU request
    status, _, raw = call(url, "POST", "/v1/completions", body)
    events = [json.loads(line[6:]) for line in raw.decode().splitlines() if line.startswith("data: {")]
    assert status == 200 and len(events) > 2 and raw.endswith(b"data: [DONE]\n\n")  # token by token
    assert events[-1]["choices"][0]["finish_reason"] == "stop"  # the stop string, not shown
    assert " can" not in "".join(e["choices"][0]["text"] for e in events)


def test_the_gateway_answers_through_the_engine_as_the_local_model_would(gateway, engine, tiny_model_dir):
    from medassist.generate import Assistant

    before = completions_served(engine[0])
    status, _, raw = call(gateway, "POST", "/v1/chat/completions", FLU)
    assert status == 200, raw
    reply = json.loads(raw)
    assert reply["choices"][0]["message"]["content"].endswith(safety.DISCLAIMER)
    assert completions_served(engine[0]) == before + 1
    # same prompt text, model, sampling and seed: the answer the predictor gives locally
    sampling = Sampling(max_new_tokens=30, temperature=1.5, top_p=1.0, seed=1)
    local = Assistant(base_model=str(tiny_model_dir), sampling=sampling).answer(FLU["messages"])
    assert reply["medassist"]["answer"] == local["answer"] and local["answer"]
    assert reply["usage"]["completion_tokens"] == 30 and reply["choices"][0]["finish_reason"] == "length"


def test_the_gateway_streams_and_an_emergency_never_reaches_the_engine(gateway, engine):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0, timeout=60)
    whole = client.chat.completions.create(model="medassist", **FLU)
    before = completions_served(engine[0])
    chunks = list(client.chat.completions.create(model="medassist", stream=True, **FLU))
    texts = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(texts) == whole.choices[0].message.content and len([t for t in texts if t]) >= 2
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    reply = client.chat.completions.create(model="medassist", messages=[{"role": "user", "content": EMERGENCY}])
    assert reply.choices[0].message.content.startswith(safety.EMERGENCY_LINE)
    assert completions_served(engine[0]) == before + 1  # the streamed question only


# ---- a stub engine: exact text, counted requests, down and slow -------------------------------------------------
def serve_in_thread(app) -> tuple[uvicorn.Server, str]:
    server = uvicorn.Server(uvicorn.Config(app, port=free_port(), log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{server.config.port}"


class Stub:
    """An OpenAI-style /v1/completions that streams `text` (after `delay` s, `pause` s between pieces), keeps every
    body, and records how each stream ended ("done" or "cancelled": its client hung up)."""

    def __init__(self):
        self.bodies, self.ended, self.text, self.delay, self.pause = [], [], STUB_TEXT, 0.0, 0.0
        app = FastAPI()

        @app.post("/v1/completions")
        async def completions(request: Request):
            self.bodies.append(await request.json())
            return StreamingResponse(self.events(), media_type="text/event-stream")

        self.server, url = serve_in_thread(app)
        self.url = f"{url}/v1"

    async def events(self):
        how = "cancelled"
        try:
            await asyncio.sleep(self.delay)
            for text in self.text:
                yield f"data: {json.dumps({'choices': [{'index': 0, 'text': text, 'finish_reason': None}]})}\n\n"
                await asyncio.sleep(self.pause)
            yield "data: [DONE]\n\n"
            how = "done"
        finally:
            self.ended.append(how)


@pytest.fixture(scope="module")
def stub():
    server = Stub()
    yield server
    server.server.should_exit = True


def gateway_app(url: str, tokenizer, timeout: float = 5.0):
    engine = Upstream(url, "stub", timeout, context=1024)
    return TestClient(create_app(engine, tokenizer, "tiny", None))


def ask(client, messages, **kwargs):
    return client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 32, **kwargs})


def test_the_engine_gets_our_template_and_its_text_goes_through_the_guard(stub, tiny_tokenizer):
    with gateway_app(stub.url, tiny_tokenizer) as client:
        reply = ask(client, SEEN, temperature=0.7, top_p=0.8, seed=5).json()
    body = stub.bodies[-1]
    assert body["prompt"] == format_conversation(SEEN) and body["stream"] is True  # exactly prompts.py's text
    assert body["stop"] == list(STOP_TOKENS) and body["max_tokens"] == 32 and body["model"] == "stub"
    assert (body["temperature"], body["top_p"], body["seed"]) == (0.7, 0.8, 5)
    answer = reply["medassist"]["answer"]
    assert DOSE not in answer and "dose_removed" in reply["medassist"]["flags"]  # the guard took the dose out
    assert answer == "Asthma is a condition of the airways. See a doctor if it gets worse."  # no made-up turn
    assert reply["choices"][0]["message"]["content"] == f"{answer}\n\n{safety.DISCLAIMER}"


def test_with_an_index_the_engine_reads_the_passage_and_the_answer_names_its_source(stub, tiny_tokenizer, tmp_path):
    from medassist import retrieval
    from medassist.index import build
    from test_retrieval import COLLECTION, write

    build([str(write(tmp_path / "collection.jsonl", COLLECTION))], tmp_path / "index", threshold=1.0)
    index = retrieval.load(tmp_path / "index")
    question = [{"role": "user", "content": "How does the flu spread?"}]
    ((grounded, sources),) = retrieval.ground(index, [question])
    with TestClient(create_app(Upstream(stub.url, "stub", 5.0, context=1024), tiny_tokenizer, "tiny",
                               index=index)) as client:
        reply = ask(client, question).json()
    assert sources and stub.bodies[-1]["prompt"] == format_conversation(grounded)  # the passage in our template
    assert "Source: " in stub.bodies[-1]["prompt"]
    assert reply["medassist"]["sources"] == sources and safety.sources_text(sources) in reply["medassist"]["answer"]


def test_a_streamed_answer_through_the_stub_is_guarded_too(stub, tiny_tokenizer):
    with gateway_app(stub.url, tiny_tokenizer) as client:
        with client.stream("POST", "/v1/chat/completions", json={"messages": SEEN, "stream": True}) as response:
            assert response.status_code == 200
            events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert DOSE not in text and text.endswith(safety.DISCLAIMER) and text.startswith("Asthma is")


def test_an_emergency_is_answered_without_the_engine(stub, tiny_tokenizer):
    before = len(stub.bodies)
    with gateway_app(stub.url, tiny_tokenizer) as client:
        for stream in (False, True):
            response = ask(client, [{"role": "user", "content": EMERGENCY}], stream=stream)
            assert response.status_code == 200 and safety.EMERGENCY_LINE in response.text
    assert len(stub.bodies) == before


def test_an_engine_that_is_down_is_a_502_naming_it(tiny_tokenizer):
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    with gateway_app(url, tiny_tokenizer) as client:
        for stream in (False, True):
            response = ask(client, SEEN, stream=stream)
            assert response.status_code == 502, response.text
            message = response.json()["error"]["message"]
            assert url in message and "not reachable" in message and "\n" not in message
        assert client.get("/health").status_code == 200


def test_a_slow_engine_is_a_504_and_the_next_request_is_answered(stub, tiny_tokenizer):
    with gateway_app(stub.url, tiny_tokenizer, timeout=0.5) as client:
        stub.delay = 2.0
        try:
            started = time.monotonic()
            for stream in (False, True):
                response = ask(client, SEEN, stream=stream)
                assert response.status_code == 504 and "0.5 s" in response.json()["error"]["message"]
            assert time.monotonic() - started < 4
        finally:
            stub.delay = 0.0
        reply = ask(client, SEEN)
        assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"].endswith(
            safety.DISCLAIMER)
        assert client.get("/health").json()["busy"] == 0


def test_upstream_options_are_checked_before_anything_loads():
    from medassist.serve import check_args, parse_args

    problems = check_args(parse_args(["--upstream", "localhost:8000", "--upstream-timeout", "0"]))
    assert any("http(s) URL" in p for p in problems) and any("--upstream-timeout" in p for p in problems)
    assert any("--upstream URL" in p for p in check_args(parse_args(["--upstream-model", "m"])))
    assert any("--raw" in p for p in check_args(parse_args(["--raw", "--upstream", "http://h:1/v1"])))


def test_a_client_that_hangs_up_cancels_the_engine_request(stub, tiny_tokenizer):
    stub.text, stub.pause = ["Flu is an infection. ", *["word "] * 400], 0.02  # 8 s of text
    server, url = serve_in_thread(create_app(Upstream(stub.url, "stub", 5.0, context=1024), tiny_tokenizer, "tiny"))
    try:
        u = urlsplit(url)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
        conn.request("POST", "/v1/chat/completions", json.dumps({"messages": SEEN, "stream": True}),
                     {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200 and response.readline().startswith(b"data: ")
        ended = len(stub.ended)
        conn.sock.shutdown(socket.SHUT_RDWR)  # hang up mid-answer
        conn.close()
        deadline = time.monotonic() + 5
        while len(stub.ended) == ended and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stub.ended[ended:] == ["cancelled"]  # the engine stopped long before its 8 s
        # The gateway's slot is given back in its own thread just after the engine sees the hang-up: wait for it.
        while json.loads(call(url, "GET", "/health")[2])["busy"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert json.loads(call(url, "GET", "/health")[2])["busy"] == 0
    finally:
        stub.text, stub.pause = STUB_TEXT, 0.0
        server.should_exit = True
