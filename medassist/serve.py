"""`python -m medassist serve`: an OpenAI-compatible chat API and a one-page web chat over medassist.generate.

Every answer goes through `generate.stream_answer` (the training prompt template and the safety layer), so no
client can skip the disclaimer or the emergency line. Decisions, also in the README ("Serving and export"):
- the question is the LAST user message, and the model reads the conversation before it (user and assistant turns,
  the disclaimer taken off earlier answers; the oldest exchanges left out first when it does not fit the context,
  never the last question); system/developer messages are not sent to the model: a system prompt must not talk it
  out of the safety layer (openai_api.conversation);
- the safety screen reads the latest user turns together (safety.screen_conversation), before the queue;
- unknown request fields are ignored, wrong-typed or out-of-range known ones refused (openai_api.py);
- one generation at a time, first come first served (two at once on 2 CPU cores are not faster); at most
  --max-queue requests wait or run, more get a 503; a client that disconnects, queued or mid-stream, stops its
  generation after the current token.
"""

import argparse
import asyncio
import hmac
import json
import logging
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from medassist import UserError, retrieval, safety
from medassist.generate import (Outcome, context_length, fixed_answer, load_for_generation, prompt_ids,
                                stream_answer)
from medassist.openai_api import (ApiError, Limits, chunk, completion, conversation, fields, parse_chat, stop_strings,
                                  usage, user_turns)
from medassist.sampling import Sampling

log = logging.getLogger("medassist.serve")

INDEX_HTML = Path(__file__).with_name("web") / "index.html"
_DONE = object()


# ---- the generation worker ----------------------------------------------------------------------------------------
class Job:
    """One request's generation: pieces travel from the worker thread to the request's event loop."""

    def __init__(self, question: str | list[dict], sampling: Sampling, screening=None, stops=()):
        self.question, self.sampling, self.screening, self.stops = question, sampling, screening, list(stops)
        self.outcome = Outcome()  # tokens generated and finish_reason, filled in before the record is put
        self.stop = threading.Event()  # set when the client goes away: generation ends after the current token
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop closed (server shutting down): nobody is listening
            pass

    async def items(self, request):
        """The pieces and the final record as they come; stops the generation when the client disconnects."""
        try:
            while True:
                try:
                    item = await asyncio.wait_for(self.queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                if item is _DONE:
                    return
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:  # also on cancellation, when Starlette notices the disconnect first
            self.stop.set()


class Worker:
    """Generates one answer at a time, first come first served; at most `max_queue` requests wait or run."""

    def __init__(self, model, tokenizer, model_name: str, adapter: str | None, max_queue: int, index=None):
        self.model, self.tokenizer, self.model_name, self.adapter = model, tokenizer, model_name, adapter
        self.index = index  # a retrieval.Index: answers from its passages, with their sources
        self.max_queue, self.busy, self.stopped = max_queue, 0, 0  # stopped: ended early, their client left
        self.lock = threading.Lock()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")

    def submit(self, job: Job) -> None:
        with self.lock:
            full = self.busy >= self.max_queue
            self.busy += not full  # _run gives the slot back
        if full:
            raise ApiError(503, f"server busy: {self.max_queue} requests are already waiting; retry shortly",
                           kind="server_busy")
        self.executor.submit(self._run, job)

    def _run(self, job: Job) -> None:  # in the worker thread
        try:
            if job.stop.is_set():  # the client left while queued
                self.stopped += 1
                return
            for item in stream_answer(self.model, self.tokenizer, job.question, job.sampling, self.model_name,
                                      self.adapter, job.stop, job.screening, job.stops, job.outcome, self.index):
                job.put(item)
            self.stopped += job.stop.is_set()  # before _DONE: a client that got everything has not set it yet
        except Exception as e:  # a bug or an out-of-memory: this request fails, the server goes on
            log.exception("generation failed")
            job.put(e)
        finally:
            with self.lock:
                self.busy -= 1
            job.put(_DONE)


class _Stream(StreamingResponse):
    """A StreamingResponse that stops its job however it ends, even when cancelled before the first event."""

    def __init__(self, job: Job, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.job = job

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.stop.set()


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
            job.put(_DONE)
        else:
            self.worker.submit(job)
        head = dict(rid=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=self.served_name)
        if not req.stream:
            return await self.whole(job, request, head, n_prompt)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return _Stream(job, self.events(job, request, head, n_prompt, include_usage),
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
            error = {"message": f"generation failed: {type(e).__name__}", "type": "server_error"}
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
               index=None):
    """The FastAPI app around a loaded model (from generate.load_for_generation) and an optional retrieval index."""
    limits = limits or Limits()
    worker = Worker(model, tokenizer, model_name, adapter, limits.max_queue, index)
    chat = Chat(worker, limits, sampling or Sampling(), served_name)
    created = int(time.time())
    info = {"model": served_name, "base_model": model_name, "adapter": Path(adapter).name if adapter else None}

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
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's, one per core: 1.6x faster than 1 on 2 quiet cores; on "
                        "a CPU busy with other work, 1 can be several times faster, README 'Serving and export')")
    return p.parse_args(argv)


def check_args(args) -> list[str]:
    """Every problem with the options at once, before a model loads."""
    problems = []
    if not 0 <= args.port <= 65535:
        problems.append(f"--port must be 0..65535, got {args.port}")
    for name in ("max_tokens_limit", "max_body_bytes", "max_queue", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not 1 <= args.max_new_tokens <= args.max_tokens_limit:
        problems.append(f"--max-new-tokens must be 1..--max-tokens-limit ({args.max_tokens_limit}), "
                        f"got {args.max_new_tokens}")
    if args.api_key is not None and not args.api_key.strip():
        problems.append("--api-key is empty; give a key or leave it out")
    return problems


def main(argv=None) -> int:
    """Bad options and a missing model raise UserError before anything is served (medassist.commands shows it)."""
    args = parse_args(argv)
    if problems := check_args(args):
        raise UserError("; ".join(problems))
    import torch
    import uvicorn

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    index = retrieval.load(args.index) if args.index else None
    model, tokenizer, name = load_for_generation(args.adapter, args.base_model, args.precision,
                                                 args.allow_template_mismatch)
    safety.screen_question("What is asthma?")  # loads the triage model now, not during the first request
    sampling = Sampling(max_new_tokens=args.max_new_tokens, repetition_penalty=args.repetition_penalty)
    limits = Limits(args.max_tokens_limit, args.max_body_bytes, args.max_queue)
    app = create_app(model, tokenizer, name, args.adapter, api_key=args.api_key, limits=limits, sampling=sampling,
                     served_name=args.model_name, index=index)
    if args.host not in ("127.0.0.1", "localhost", "::1") and args.api_key is None:
        log.warning("listening on %s without an API key: anyone who can reach it can use it", args.host)
    log.info("serving %s%s at http://%s:%d/ (API under /v1)", name, f" + {args.adapter}" if args.adapter else "",
             args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=5)
    return 0
