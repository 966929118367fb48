"""`python -m medassist serve`: an OpenAI-compatible chat API and a one-page web chat over medassist.generate.

Every answer goes through `generate.stream_answer` (the training prompt template and the safety layer), so no
client can skip the disclaimer or the emergency line. Decisions, also in the README ("Serving and export"):
- the question is the LAST user message; earlier turns and system/developer messages are not sent to the model:
  it was trained on single turns, and a system prompt must not talk it out of the safety layer;
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
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from medassist import UserError, safety
from medassist.generate import (Sampling, context_length, fixed_answer, load_for_generation, prompt_ids,
                                stream_answer)
from medassist.openai_api import ApiError, Limits, chunk, fields, parse_chat, user_turns

log = logging.getLogger("medassist.serve")

INDEX_HTML = Path(__file__).with_name("web") / "index.html"
_DONE = object()


# ---- the generation worker ----------------------------------------------------------------------------------------
class Job:
    """One request's generation: pieces travel from the worker thread to the request's event loop."""

    def __init__(self, question: str, sampling: Sampling, screening=None):
        self.question, self.sampling, self.screening = question, sampling, screening
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


def create_app(model, tokenizer, model_name: str, adapter: str | None = None, *, api_key: str | None = None,
               limits: Limits | None = None, sampling: Sampling | None = None, served_name: str = "medassist"):
    """The FastAPI app around a loaded model (from generate.load_for_generation)."""
    limits, defaults = limits or Limits(), sampling or Sampling()
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")  # one at a time, in arrival order
    busy, busy_lock = [0], threading.Lock()  # requests waiting or generating
    stopped = [0]  # generations ended early because their client left: /health reports it
    created = int(time.time())
    info = {"model": served_name, "base_model": model_name, "adapter": Path(adapter).name if adapter else None}

    def generate(job: Job) -> None:  # runs in the worker thread
        try:
            if job.stop.is_set():  # the client left while queued
                stopped[0] += 1
                return
            for item in stream_answer(model, tokenizer, job.question, job.sampling, model_name, adapter, job.stop,
                                      job.screening):
                job.put(item)
            stopped[0] += job.stop.is_set()  # before _DONE: a client that got everything has not set it yet
        except Exception as e:  # a bug or an out-of-memory: this request fails, the server goes on
            log.exception("generation failed")
            job.put(e)
        finally:
            with busy_lock:
                busy[0] -= 1
            job.put(_DONE)

    # No /docs: Swagger UI loads its assets from a CDN, and this server works offline. On shutdown uvicorn cancels
    # open streams, which sets their jobs' stop events, so the worker thread ends promptly.
    app = FastAPI(title="medassist", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    @app.exception_handler(HTTPException)  # 404, 405: the same JSON shape as our own errors
    @app.exception_handler(Exception)  # a bug: a JSON 500, and the server goes on
    async def _error(request, e: Exception):
        if isinstance(e, HTTPException):
            e = ApiError(e.status_code, f"{e.detail}: {request.method} {request.url.path}")
        elif not isinstance(e, ApiError):
            log.exception("unexpected error")
            e = ApiError(500, f"internal error: {type(e).__name__}", kind="server_error")
        return e.response()

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>' with the key the "
                                "server was started with (--api-key or MEDASSIST_API_KEY)", kind="authentication_error")

    async def read_body(request: Request) -> bytes:
        too_big = ApiError(413, f"request body is over the limit of {limits.max_body_bytes} bytes; send a shorter "
                                f"conversation (only the last user message is answered)")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limits.max_body_bytes:
            raise too_big
        body = bytearray()
        async for part in request.stream():  # counted as it arrives: a chunked upload cannot dodge the limit
            body += part
            if len(body) > limits.max_body_bytes:
                raise too_big
        return bytes(body)

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(INDEX_HTML.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health():
        return {"status": "ok", **info, "busy": busy[0], "stopped_early": stopped[0]}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": served_name, "object": "model", "created": created,
                                            "owned_by": "medassist", "medassist": info}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        authorize(request)
        req, question, sampling = parse_chat(await read_body(request), limits, defaults)
        try:
            n_prompt = len(prompt_ids(tokenizer, question, context_length(model), sampling.max_new_tokens))
        except UserError as e:
            raise ApiError(400, f"last user message: {e}", "messages") from None
        # Screened before the queue, over the conversation's latest user turns: an emergency gets its escalation
        # at once, however many answers are being generated for others.
        screening = await asyncio.to_thread(safety.screen_conversation, user_turns(req))
        job = Job(question, sampling, screening)
        if screening.urgent:
            for item in fixed_answer(screening, question, model_name, adapter):
                job.put(item)
            job.put(_DONE)
        else:
            with busy_lock:
                full = busy[0] >= limits.max_queue
                busy[0] += not full  # generate() gives the slot back
            if full:
                raise ApiError(503, f"server busy: {limits.max_queue} requests are already waiting; retry shortly",
                               kind="server_busy")
            worker.submit(generate, job)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        flags = list(screening.flags)  # known before any token: the page shows a banner

        def usage(content: str) -> dict:
            n_out = len(tokenizer(content, add_special_tokens=False)["input_ids"])
            return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}

        if not req.stream:
            record = None
            async for item in job.items(request):
                record = item if isinstance(item, dict) else record
            if record is None:  # the client disconnected; nobody reads this
                return JSONResponse({}, status_code=499)
            content = safety.render(record)  # answer, blank line, disclaimer: what predict prints
            message = {"role": "assistant", "content": content}
            return {"id": rid, "object": "chat.completion", "created": now, "model": served_name,
                    "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}],
                    "usage": usage(content), "medassist": fields(record)}

        async def events():
            yield chunk(rid, now, served_name, {"role": "assistant", "content": ""},
                         medassist={"flags": flags, "disclaimer": safety.DISCLAIMER})
            pieces = []
            try:
                async for item in job.items(request):
                    if isinstance(item, dict):
                        yield chunk(rid, now, served_name, {}, "stop", medassist=fields(item))
                    else:
                        pieces.append(item)
                        yield chunk(rid, now, served_name, {"content": item})
            except Exception as e:  # headers are sent: report it in the stream (the openai client raises on it)
                error = {"message": f"generation failed: {type(e).__name__}", "type": "server_error"}
                yield f"data: {json.dumps({'error': error})}\n\n"
                return
            if req.stream_options and req.stream_options.include_usage:
                yield chunk(rid, now, served_name, None, usage=usage("".join(pieces)))
            yield "data: [DONE]\n\n"

        return _Stream(job, events(), media_type="text/event-stream",
                       headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


# ---- the command --------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m medassist serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", help="a lora_adapter/ directory written by fit; omit to answer with the base model")
    p.add_argument("--base-model", help="base model source (default: the adapter's, else 'embedded')")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--allow-template-mismatch", action="store_true")
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
    import uvicorn

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if problems := check_args(args):
        print("medassist serve: error: " + "; ".join(problems), file=sys.stderr)
        return 2
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        model, tokenizer, name = load_for_generation(args.adapter, args.base_model, args.precision,
                                                     args.allow_template_mismatch)
    except UserError as e:
        print(f"medassist serve: error: {e}", file=sys.stderr)
        return 2
    safety.screen_question("What is asthma?")  # loads the triage model now, not during the first request
    sampling = Sampling(max_new_tokens=args.max_new_tokens, repetition_penalty=args.repetition_penalty)
    limits = Limits(args.max_tokens_limit, args.max_body_bytes, args.max_queue)
    app = create_app(model, tokenizer, name, args.adapter, api_key=args.api_key, limits=limits, sampling=sampling,
                     served_name=args.model_name)
    if args.host not in ("127.0.0.1", "localhost", "::1") and args.api_key is None:
        log.warning("listening on %s without an API key: anyone who can reach it can use it", args.host)
    log.info("serving %s%s at http://%s:%d/ (API under /v1)", name, f" + {args.adapter}" if args.adapter else "",
             args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=5)
    return 0
