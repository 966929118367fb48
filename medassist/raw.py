"""`python -m medassist serve --raw`: the model served as a raw engine, OpenAI's /v1/completions (prompt text in,
text out, streaming, stop strings), with NO safety layer: no screen, no guard, no disclaimer.

For a gateway in front of it (`serve --upstream`, upstream.py) and for tests; never for people. It has no chat
endpoint, so nothing mistakes it for the server that answers people.
"""

import hmac
import json
import logging
import threading
import time
import uuid
from itertools import chain

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medassist.generate import Generation, StopAt, context_length, load_for_generation
from medassist.jobs import Job, Stream, Worker
from medassist.openai_api import ApiError, Limits, usage
from medassist.prompts import encode_text
from medassist.sampling import Sampling

log = logging.getLogger("medassist.serve")


class CompletionRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)

    model: str = ""
    prompt: str = Field(min_length=1)
    stream: bool = False
    max_tokens: int = Field(16, ge=1)  # OpenAI's defaults
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    repetition_penalty: float = Field(1.0, gt=0)
    stream_options: dict | None = None


def raw_pieces(model, tokenizer, ids: list[int], sampling: Sampling, stop: threading.Event, stops, outcome):
    """The model's continuation of `ids`, as text pieces; it ends at the model's stop ids (eos, turn markers), at a
    stop string (not shown) or at max_tokens."""
    generation, cut = Generation(model, tokenizer, ids, sampling, stop), StopAt(stops)
    try:
        for piece in chain(generation.streamer, [None]):
            piece = cut.feed(piece) if piece is not None else cut.close()
            if cut.hit:
                generation.halt.set()
            if piece:
                yield piece
    except BaseException:  # closed early: generate for nobody no more
        stop.set()
        raise
    ended = generation.join()
    outcome.tokens, outcome.finish_reason = ended.tokens, ended.finish_reason


class RawWorker(Worker):
    def produce(self, job: Job):
        return raw_pieces(self.model, self.tokenizer, job.question, job.sampling, job.stop, job.stops, job.outcome)


def _parse(body: bytes, limits: Limits) -> CompletionRequest:
    try:
        req = CompletionRequest.model_validate_json(body)
    except ValidationError as e:
        first = e.errors()[0]
        raise ApiError(400, f"{'.'.join(map(str, first['loc'])) or 'body'}: {first['msg']}") from None
    if req.max_tokens > limits.max_tokens:
        raise ApiError(400, f"max_tokens={req.max_tokens} is over this server's limit of {limits.max_tokens}")
    return req


def _event(head: dict, text: str | None, finish: str | None = None, **extra) -> str:
    choices = [] if text is None else [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]
    return f"data: {json.dumps({**head, 'choices': choices, **extra}, ensure_ascii=False)}\n\n"


async def _events(job: Job, request: Request, head: dict, n_prompt: int, include_usage: bool):
    try:
        async for piece in job.items(request):
            yield _event(head, piece)
    except Exception as e:  # headers are sent: say it in the stream, as vLLM does
        yield f"data: {json.dumps({'error': {'message': f'generation failed: {type(e).__name__}'}})}\n\n"
        return
    yield _event(head, "", job.outcome.finish_reason)
    if include_usage:
        yield _event(head, None, usage=usage(n_prompt, job.outcome.tokens))
    yield "data: [DONE]\n\n"


def create_raw_app(model, tokenizer, served_name: str, limits: Limits | None = None, api_key: str | None = None):
    """The raw engine around a loaded model: POST /v1/completions (streaming or not), GET /v1/models, /health."""
    limits = limits or Limits()
    worker, served = RawWorker(model, tokenizer, served_name, None, limits.max_queue), {"completions": 0}
    app = FastAPI(title="medassist raw engine (no safety layer)", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(ApiError, lambda request, e: e.response())

    def authorize(request: Request) -> None:
        given = request.headers.get("authorization", "").encode()
        if api_key and not hmac.compare_digest(given, f"Bearer {api_key}".encode()):
            raise ApiError(401, "missing or wrong API key", kind="authentication_error")

    @app.get("/health")
    async def health():  # "completions": how many prompts reached the model (a test counts them)
        return {"status": "ok", "raw": True, "safety_layer": None, "model": served_name, **served,
                "busy": worker.busy}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": served_name, "object": "model", "owned_by": "medassist-raw",
                                            "max_model_len": context_length(model)}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        authorize(request)
        req = _parse(await request.body(), limits)
        served["completions"] += 1
        ids = encode_text(tokenizer, req.prompt, bos=True)  # as engines do: <bos>, then the text's own tokens
        if len(ids) + req.max_tokens > context_length(model):
            raise ApiError(400, f"prompt is {len(ids)} tokens; with max_tokens={req.max_tokens} it is over the "
                                f"context of {context_length(model)}", "prompt")
        sampling = Sampling(max_new_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p,
                            seed=req.seed or 0, repetition_penalty=req.repetition_penalty)
        job = Job(ids, sampling, stops=[req.stop] if isinstance(req.stop, str) else req.stop or [])
        worker.submit(job)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": served_name}
        if req.stream:
            include_usage = bool((req.stream_options or {}).get("include_usage"))
            return Stream(job, _events(job, request, head, len(ids), include_usage), media_type="text/event-stream")
        text = "".join([piece async for piece in job.items(request)])
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": job.outcome.finish_reason}
        return {**head, "choices": [choice], "usage": usage(len(ids), job.outcome.tokens)}

    return app


def raw_app(args):
    """`serve --raw`: the model (+ adapter) loaded as for answering, served raw."""
    model, tokenizer, name = load_for_generation(args.adapter, args.base_model, args.precision,
                                                 args.allow_template_mismatch, args.decode_weights)
    log.warning("RAW ENGINE: /v1/completions continues any prompt text with %s%s; NO safety layer (no screen, no "
                "guard, no disclaimer). Put `python -m medassist serve --upstream URL` in front of it; never let "
                "people use it directly", name, f" + {args.adapter}" if args.adapter else "")
    limits = Limits(args.max_tokens_limit, args.max_body_bytes, args.max_queue)
    return create_raw_app(model, tokenizer, args.model_name, limits, args.api_key)
