"""Requests/s and time to first token of a running `python -m medassist serve`, for 1, 2, 4 ... concurrent clients.

    python -m medassist serve --port 8000 &          # wait for /health
    python scripts/load_test.py --clients 1 2 4 --requests 3 --max-tokens 64

Loopback only, and bounded: each client sends --requests streaming requests one after another, and no request
starts after --time-limit seconds. Time to first token = from sending the request to the first non-empty content
chunk, queueing included (the server shows text a whole sentence at a time). "same as alone": the answers that are
the text the same question got from the 1-client level (run it first; greedy decoding gives one text per question).
"""

import argparse
import http.client
import json
import statistics
import sys
import threading
import time
from urllib.parse import urlsplit

QUESTIONS = ["What is asthma?", "How can I lower my blood pressure?", "What are the symptoms of diabetes?",
             "How does the flu spread?", "What causes migraines?", "How much sleep do adults need?"]


def one_request(url, question: str, max_tokens: int, api_key: str | None) -> dict:
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    start = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body).encode(), headers=headers)
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:300]!r}")
    first, tokens, text = None, 0, []
    for line in response:
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            first = first if first is not None else time.perf_counter() - start
            text.append(chunk["choices"][0]["delta"]["content"])
    conn.close()
    return {"ttft": first, "latency": time.perf_counter() - start, "tokens": tokens, "question": question,
            "text": "".join(text)}


def run_level(url, clients: int, requests: int, max_tokens: int, api_key, deadline: float) -> dict:
    results, errors = [], []

    def client(index: int) -> None:
        for i in range(requests):
            if time.monotonic() > deadline:
                return
            try:
                results.append(one_request(url, QUESTIONS[(index + i * clients) % len(QUESTIONS)], max_tokens, api_key))
            except Exception as e:  # counted, not fatal: a load test reports failures
                errors.append(str(e))

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ttfts = [r["ttft"] for r in results if r["ttft"] is not None]
    return {"clients": clients, "requests": len(results), "errors": len(errors), "wall_s": wall,
            "req_per_s": len(results) / wall, "tokens_per_s": sum(r["tokens"] for r in results) / wall,
            "ttft_p50": statistics.median(ttfts) if ttfts else float("nan"), "ttft_max": max(ttfts, default=float("nan")),
            "latency_p50": statistics.median(r["latency"] for r in results) if results else float("nan"),
            "answers": [(r["question"], r["text"]) for r in results]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--requests", type=int, default=3, help="requests per client (at most 20)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--time-limit", type=float, default=600, help="no request starts after this many seconds")
    p.add_argument("--api-key")
    args = p.parse_args(argv)
    host = urlsplit(args.url).hostname
    if host not in ("127.0.0.1", "localhost", "::1") and not (host or "").startswith("127."):
        p.error(f"--url must be a loopback address (127.0.0.1, localhost, ::1), got {host!r}")
    if not 1 <= args.requests <= 20 or not all(1 <= c <= 16 for c in args.clients):
        p.error("--requests must be 1..20 and each --clients value 1..16")
    deadline = time.monotonic() + args.time_limit
    print("| clients | requests | errors | req/s | returned tok/s | TTFT p50 (s) | TTFT max (s) | latency p50 (s) "
          "| same as alone |")
    print("|---|---|---|---|---|---|---|---|---|")
    alone = {}  # question -> the answer it got with one client (greedy decoding: the same text every time)
    for clients in args.clients:
        r = run_level(args.url, clients, args.requests, args.max_tokens, args.api_key, deadline)
        if clients == 1:
            alone.update(r["answers"])
        known = [(q, text) for q, text in r["answers"] if q in alone]
        same = "reference" if clients == 1 else f"{sum(alone[q] == text for q, text in known)}/{len(known)}" if (
            known) else "-"
        print(f"| {r['clients']} | {r['requests']} | {r['errors']} | {r['req_per_s']:.2f} | {r['tokens_per_s']:.1f} "
              f"| {r['ttft_p50']:.2f} | {r['ttft_max']:.2f} | {r['latency_p50']:.2f} | {same} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
