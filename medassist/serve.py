"""`python -m medassist serve`: an OpenAI-compatible chat API and a one-page web chat over medassist.generate.

Every answer goes through `generate.stream_answer` (the training prompt template and the safety layer), so no
client can skip the disclaimer or the emergency line. Decisions, also in the README ("Serving and export"):
- the question is the LAST user message, and the model reads the conversation before it (user and assistant turns,
  the disclaimer taken off earlier answers; the oldest exchanges left out first when it does not fit the context,
  never the last question); system/developer messages are not sent to the model: a system prompt must not talk it
  out of the safety layer (openai_api.conversation);
- the safety screen reads the latest user turns together (safety.screen_conversation), before the queue;
- unknown request fields are ignored, wrong-typed or out-of-range known ones refused (openai_api.py);
- the answers being generated share each model step (batching.Batcher: up to --max-batch rows, one token for all
  per step; a request joins between two steps, after its prompt is computed alone); at most --max-queue requests
  wait or run, more get a 503; a client that disconnects, queued or mid-stream, stops its generation after the
  current token. `--max-batch 1`: one answer at a time, first come first served, through model.generate.
- `--upstream URL`: the same requests, screen, template, guard and disclaimer, but a serving engine generates
  (upstream.py: our prompt text to its /v1/completions, streamed back through the guard); up to --max-queue at
  once, as the engine batches them; an engine down is a 502, silent past --upstream-timeout a 504 (a stream's
  headers wait for its first sentence, so these are HTTP errors too); escalations never reach it.
- `--raw`: the model served as such an engine, with NO safety layer (raw.py; for a gateway and tests).
"""

import argparse
import asyncio
import hmac
import json
import logging
import os
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException

from medassist import UserError, raw, retrieval, safety, upstream
from medassist.batching import MAX_BATCH, Batcher
from medassist.generate import context_length, fixed_answer, load_for_generation, prompt_ids
from medassist.jobs import DONE, Job, Stream, Worker
from medassist.openai_api import (ApiError, Limits, chunk, completion, conversation, fields, parse_chat, stop_strings,
                                  usage, user_turns)
from medassist.sampling import Sampling, add_decode_weights_argument

log = logging.getLogger("medassist.serve")

INDEX_HTML = Path(__file__).with_name("web") / "index.html"


# ---- one chat request ---------------------------------------------------------------------------------------------
class Chat:
    """POST /v1/chat/completions: check the request, screen the conversation, answer a whole reply or a stream.

    Screened before the queue, over the conversation's latest user turns: an emergency gets its fixed answer at once
    (no model runs), however many answers are being generated for others.
    """

    def __init__(self, worker: Worker, limits: Limits, defaults: Sampling, served_name: str):
        self.worker, self.limits, self.defaults, self.served_name = worker, limits, defaults, served_name

    async def __call__(self, request: Request, body: bytes):
        req, question, sampling = parse_chat(body, self.limits, self.defaults)
        messages = conversation(req, question)
        screening = await asyncio.to_thread(safety.screen_conversation, user_turns(req))
        # an escalation needs no model, so a question too long for its context still gets it; usage counts the
        # prompt without a retrieved passage (added in the worker)
        n_prompt = 0 if screening.urgent else self.prompt_tokens(messages, sampling)
        job = Job(messages, sampling, screening, stop_strings(req))
        if screening.urgent:
            w = self.worker
            for item in fixed_answer(screening, messages, w.model_name, w.adapter):
                job.put(item)
            job.put(DONE)
        else:
            self.worker.submit(job)
            if req.stream and isinstance(self.worker.model, upstream.Upstream):
                await job.first(request)  # an engine down or slow is a 502/504, not an error inside a 200 stream
        head = dict(rid=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=self.served_name)
        if not req.stream:
            return await self.whole(job, request, head, n_prompt)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return Stream(job, self.events(job, request, head, n_prompt, include_usage),
                       media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def prompt_tokens(self, question: str | list[dict], sampling: Sampling) -> int:
        model, tokenizer = self.worker.model, self.worker.tokenizer
        try:
            return len(prompt_ids(tokenizer, question, context_length(model), sampling.max_new_tokens))
        except UserError as e:
            raise ApiError(400, f"last user message: {e}", "messages") from None

    @staticmethod
    async def whole(job: Job, request: Request, head: dict, n_prompt: int):
        record = None
        async for item in job.items(request):
            record = item if isinstance(item, dict) else record
        if record is None:  # the client disconnected; nobody reads this
            return JSONResponse({}, status_code=499)
        content = safety.render(record)  # answer, blank line, disclaimer: what predict prints
        return completion(head["rid"], head["created"], head["model"], content, job.outcome.finish_reason,
                          usage(n_prompt, job.outcome.tokens), medassist=fields(record))

    @staticmethod
    async def events(job: Job, request: Request, head: dict, n_prompt: int, include_usage: bool):
        rid, now, name = head["rid"], head["created"], head["model"]
        flags = list(job.screening.flags)  # known before any token: the page shows a banner
        yield chunk(rid, now, name, {"role": "assistant", "content": ""},
                    medassist={"flags": flags, "disclaimer": safety.DISCLAIMER})
        try:
            async for item in job.items(request):
                if isinstance(item, dict):
                    yield chunk(rid, now, name, {}, job.outcome.finish_reason, medassist=fields(item))
                else:
                    yield chunk(rid, now, name, {"content": item})
        except Exception as e:  # headers are sent: report it in the stream (the openai client raises on it)
            said = e.message if isinstance(e, ApiError) else type(e).__name__
            error = {"message": f"generation failed: {said}", "type": "server_error"}
            yield f"data: {json.dumps({'error': error})}\n\n"
            return
        if include_usage:
            yield chunk(rid, now, name, None, usage=usage(n_prompt, job.outcome.tokens))
        yield "data: [DONE]\n\n"


# ---- the app ------------------------------------------------------------------------------------------------------
def authorize(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>' with the key the "
                            "server was started with (--api-key or MEDASSIST_API_KEY)", kind="authentication_error")


async def read_body(request: Request, max_bytes: int) -> bytes:
    too_big = ApiError(413, f"request body is over the limit of {max_bytes} bytes; send a shorter "
                            f"conversation (its oldest turns first: the model reads only what fits its context anyway)")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_bytes:
        raise too_big
    body = bytearray()
    async for part in request.stream():  # counted as it arrives: a chunked upload cannot dodge the limit
        body += part
        if len(body) > max_bytes:
            raise too_big
    return bytes(body)


async def _error(request, e: Exception):
    """Every error as OpenAI's JSON: ours, Starlette's 404/405, and a bug (a 500; the server goes on)."""
    if isinstance(e, HTTPException):
        e = ApiError(e.status_code, f"{e.detail}: {request.method} {request.url.path}")
    elif not isinstance(e, ApiError):
        log.exception("unexpected error")
        e = ApiError(500, f"internal error: {type(e).__name__}", kind="server_error")
    return e.response()


def create_app(model, tokenizer, model_name: str, adapter: str | None = None, *, api_key: str | None = None,
               limits: Limits | None = None, sampling: Sampling | None = None, served_name: str = "medassist",
               index=None, max_batch: int = MAX_BATCH):
    """The FastAPI app around a loaded model (from generate.load_for_generation), or an engine that generates for it
    (an upstream.Upstream: same screen, template, guard and disclaimer), and an optional retrieval index.
    A local model answers up to `max_batch` requests together (batching.Batcher, which switches the model's attention
    to its row-by-row implementation and keeps a decoding thread for the life of the process); 1: one at a time."""
    limits = limits or Limits()
    remote = isinstance(model, upstream.Upstream)
    if not remote and max_batch > 1:
        model = Batcher(model, tokenizer, max_batch)
    # an engine (or the Batcher) takes the requests it is sent at once; our threads only wait for their text (and
    # run the guard)
    worker = Worker(model, tokenizer, model_name, adapter, limits.max_queue, index,
                    threads=limits.max_queue if remote or max_batch > 1 else 1)
    chat = Chat(worker, limits, sampling or Sampling(), served_name)
    created = int(time.time())
    info = {"model": served_name, "base_model": model_name, "adapter": Path(adapter).name if adapter else None,
            **({"upstream": model.url, "upstream_model": model.model} if remote else {"max_batch": max_batch})}

    # No /docs: Swagger UI loads its assets from a CDN, and this server works offline. On shutdown uvicorn cancels
    # open streams, which sets their jobs' stop events, so the worker thread ends promptly.
    app = FastAPI(title="medassist", docs_url=None, redoc_url=None, openapi_url=None)
    for kind in (ApiError, HTTPException, Exception):
        app.add_exception_handler(kind, _error)

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(INDEX_HTML.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health():
        return {"status": "ok", **info, "busy": worker.busy, "stopped_early": worker.stopped}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request, api_key)
        return {"object": "list", "data": [{"id": served_name, "object": "model", "created": created,
                                            "owned_by": "medassist", "medassist": info}]}

    @app.post("/v1/chat/completions")
    async def completions(request: Request):
        authorize(request, api_key)
        return await chat(request, await read_body(request, limits.max_body_bytes))

    return app


# ---- the command --------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m medassist serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", help="a lora_adapter/ directory written by fit; omit to answer with the base model")
    p.add_argument("--base-model", help="base model source (default: the adapter's, else 'embedded')")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    add_decode_weights_argument(p)
    p.add_argument("--allow-template-mismatch", action="store_true")
    p.add_argument("--index", help="answer from a retrieval index (`python -m medassist index build`), naming the "
                                   "sources")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes the server: set an API key")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("MEDASSIST_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $MEDASSIST_API_KEY, else none)")
    p.add_argument("--model-name", default="medassist", help="the model id that /v1/models reports")
    p.add_argument("--max-new-tokens", type=int, default=Sampling.max_new_tokens, help="when a request sets none")
    p.add_argument("--max-tokens-limit", type=int, default=Limits.max_tokens, help="the most a request may ask for")
    p.add_argument("--repetition-penalty", type=float, default=Sampling.repetition_penalty)
    p.add_argument("--max-body-bytes", type=int, default=Limits.max_body_bytes)
    p.add_argument("--max-queue", type=int, default=Limits.max_queue, help="requests waiting or running; more: 503")
    p.add_argument("--max-batch", type=int, default=MAX_BATCH, help="answers generated together, one model step "
                   "for all (1: one at a time; README 'Serving and export')")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's, one per core: 1.6x faster than 1 on 2 quiet cores; on "
                        "a CPU busy with other work, 1 can be several times faster, README 'Serving and export')")
    g = p.add_argument_group("in front of a serving engine (vLLM, SGLang, llama.cpp's server)")
    g.add_argument("--upstream", metavar="URL", help="generate with the OpenAI-compatible engine at URL "
                   "(e.g. http://localhost:8000/v1) through its /completions, sent our template's prompt; the screen, "
                   "guard and disclaimer stay here, no model loads (only the tokenizer of --base-model/--adapter)")
    g.add_argument("--upstream-model", metavar="NAME", help="the model name the engine serves (vLLM: the "
                   "--lora-modules name); default: the engine's only model")
    g.add_argument("--upstream-timeout", type=float, default=upstream.TIMEOUT, metavar="S",
                   help="seconds to wait for the engine's first token, and between tokens; then a 504")
    g.add_argument("--upstream-api-key", default=os.environ.get("MEDASSIST_UPSTREAM_API_KEY") or None,
                   help="the engine's API key (default: $MEDASSIST_UPSTREAM_API_KEY)")
    g.add_argument("--raw", action="store_true", help="serve the model as a RAW engine: /v1/completions, prompt "
                   "text in, text out, NO safety layer (no screen, guard or disclaimer); for a gateway "
                   "(--upstream) and tests, never for people")
    return p.parse_args(argv)


def check_args(args) -> list[str]:
    """Every problem with the options at once, before a model loads."""
    problems = []
    if not 0 <= args.port <= 65535:
        problems.append(f"--port must be 0..65535, got {args.port}")
    for name in ("max_tokens_limit", "max_body_bytes", "max_queue", "max_batch", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not 1 <= args.max_new_tokens <= args.max_tokens_limit:
        problems.append(f"--max-new-tokens must be 1..--max-tokens-limit ({args.max_tokens_limit}), "
                        f"got {args.max_new_tokens}")
    if args.api_key is not None and not args.api_key.strip():
        problems.append("--api-key is empty; give a key or leave it out")
    return problems + upstream_problems(args)


def upstream_problems(args) -> list[str]:
    problems = []
    if args.raw and (args.upstream or args.index):
        problems.append("--raw serves the model itself, with no retrieval: leave out --upstream and --index")
    if args.upstream:
        u = urlsplit(args.upstream)
        if u.scheme not in ("http", "https") or not u.hostname:
            problems.append(f"--upstream must be an http(s) URL like http://localhost:8000/v1, got {args.upstream!r}")
    elif args.upstream_model:
        problems.append("--upstream-model names the engine's model: give --upstream URL too")
    if not args.upstream_timeout > 0:
        problems.append(f"--upstream-timeout must be more than 0 seconds, got {args.upstream_timeout}")
    return problems


def main(argv=None) -> int:
    """Bad options and a missing model raise UserError before anything is served (medassist.commands shows it)."""
    args = parse_args(argv)
    if problems := check_args(args):
        raise UserError("; ".join(problems))
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.raw:
        return serve(raw.raw_app(args), args, "RAW engine (NO safety layer: no screen, guard or disclaimer; for a "
                                                   "gateway or tests, never for people)")
    index = retrieval.load(args.index) if args.index else None
    if args.upstream:
        model, tokenizer, name = upstream.connect(args)
    else:
        model, tokenizer, name = load_for_generation(args.adapter, args.base_model, args.precision,
                                                     args.allow_template_mismatch, args.decode_weights)
    safety.screen_question("What is asthma?")  # loads the triage model now, not during the first request
    sampling = Sampling(max_new_tokens=args.max_new_tokens, repetition_penalty=args.repetition_penalty)
    limits = Limits(args.max_tokens_limit, args.max_body_bytes, args.max_queue)
    app = create_app(model, tokenizer, name, args.adapter, api_key=args.api_key, limits=limits, sampling=sampling,
                     served_name=args.model_name, index=index, max_batch=args.max_batch)
    what = f"{name}{f' + {args.adapter}' if args.adapter else ''}"
    if args.upstream:
        what = f"a gateway to {model.model} at {model.url} (it generates; screen, template, guard, disclaimer here)"
    return serve(app, args, what)


def serve(app, args, what: str) -> int:
    import uvicorn

    if args.host not in ("127.0.0.1", "localhost", "::1") and args.api_key is None:
        log.warning("listening on %s without an API key: anyone who can reach it can use it", args.host)
    log.info("serving %s at http://%s:%d/ (API under /v1)", what, args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=5)
    return 0
