"""The OpenAI chat-completions wire format for medassist.serve: request checks, errors, stream chunks.

Pure functions and pydantic models, no server: a bad request becomes an ApiError whose message names the field.
Unknown fields are ignored (OpenAI clients send many: user, frequency_penalty, ...); known fields with a wrong type
or out of range are refused, and so are features this server does not have (n > 1, logprobs, tools), with a 400
that says so rather than an answer that silently lacks them; the question is the last user message (see serve.py).
No torch: the wire format can be checked without a model.
"""

import json
import secrets
from dataclasses import dataclass, replace
from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medassist import safety
from medassist.sampling import Sampling

EXAMPLE = '{"model": "medassist", "messages": [{"role": "user", "content": "What is asthma?"}]}'


@dataclass
class Limits:
    """What one request may ask for. Defaults suit the embedded 270M model on a 2-core CPU."""

    max_tokens: int = 512  # the most new tokens a request may ask for
    max_body_bytes: int = 1 << 20  # 1 MiB: far more than a question that fits gemma-3's context
    max_queue: int = 16  # requests waiting or generating at once; more get 503


class ApiError(Exception):
    """An error a client can act on, sent as OpenAI's {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}
        return JSONResponse(body, status_code=self.status, headers=headers)


# ---- the request --------------------------------------------------------------------------------------------------
class _Strict(BaseModel):
    # strict: "0.5" is not a number and 1 is not a bool; extra="ignore": fields we do not use are accepted
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatRequest(_Strict):
    model: str = "medassist"  # any name is answered by the one model this server holds
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    seed: int | None = Field(None, ge=0, lt=2**63)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = Field(None, max_length=4)  # OpenAI allows up to 4 stop strings
    stream_options: StreamOptions | None = None


# Fields that ask for something this server does not do, and the values that ask for nothing.
UNSUPPORTED = {"logprobs": (None, False), "top_logprobs": (None,), "tools": (None, []), "tool_choice": (None, "none"),
               "functions": (None, []), "function_call": (None, "none")}


def _refuse_unsupported(data: dict) -> None:
    for name, harmless in UNSUPPORTED.items():
        if name in data and data[name] not in harmless:
            raise ApiError(400, f"{name} is not supported by this server (a medical-education assistant that only "
                                f"answers in text); leave {name} out", name)


def stop_strings(request: ChatRequest) -> list[str]:
    """The request's `stop` as a list (a single string is one stop string)."""
    return [request.stop] if isinstance(request.stop, str) else list(request.stop or [])


def _describe(error: ValidationError) -> tuple[str, str]:
    """'messages.0.role: Input should be ...' for the first few problems, and the first field's name."""
    problems = [(".".join(str(part) for part in e["loc"]), e["msg"]) for e in error.errors()[:4]]
    return "; ".join(f"{loc or 'body'}: {msg}" for loc, msg in problems), problems[0][0].split(".")[0]


def parse_chat(body: bytes, limits: Limits, defaults: Sampling) -> tuple[ChatRequest, str, Sampling]:
    """(request, question, sampling) from a request body, or an ApiError(400) saying what is wrong."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON ({e}); send e.g. {EXAMPLE}") from None
    except RecursionError:
        raise ApiError(400, "request body nests too deeply to be a chat request") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(data).__name__}; send e.g. {EXAMPLE}")
    _refuse_unsupported(data)
    try:
        request = ChatRequest.model_validate(data)
    except ValidationError as e:
        message, param = _describe(e)
        raise ApiError(400, message, param) from None
    if request.n != 1:
        raise ApiError(400, f"n={request.n} is not supported: this server gives one answer per request; send n=1 or "
                            f"leave n out (and send the request again for another answer)", "n")
    if any(not s for s in stop_strings(request)):
        raise ApiError(400, "stop: stop strings must not be empty", "stop")
    users = [m for m in request.messages if m.role == "user"]
    if not users:
        raise ApiError(400, "messages has no message with role 'user'; the last user message is the question",
                       "messages")
    try:
        question = safety.validate_question(_text(users[-1]))
    except ValueError as e:
        raise ApiError(400, f"last user message: {e}", "messages") from None
    max_tokens = request.max_completion_tokens or request.max_tokens or defaults.max_new_tokens
    if max_tokens > limits.max_tokens:
        raise ApiError(400, f"max_tokens={max_tokens} is over this server's limit of {limits.max_tokens}",
                       "max_tokens")
    temperature = defaults.temperature if request.temperature is None else request.temperature
    # Without a seed, sampled answers differ between requests (as OpenAI's do); greedy ones never depend on it.
    seed = request.seed if request.seed is not None else (secrets.randbelow(2**31) if temperature else defaults.seed)
    sampling = replace(defaults, max_new_tokens=max_tokens, temperature=temperature, seed=seed,
                       top_p=defaults.top_p if request.top_p is None else request.top_p)
    return request, question, sampling


def _text(message: Message) -> str:
    content = message.content
    return content if isinstance(content, str) else "\n".join(part.text for part in content or [])


def conversation(request: ChatRequest, question: str) -> list[dict]:
    """What the model reads: the user and assistant turns before the last user message, then `question` (that
    message, validated). System and developer messages are left out (the model was not trained to obey them, and
    they must not talk it out of the safety layer; the screen and the guard run whatever they say), the disclaimer
    is taken off earlier answers, empty turns and answers before the first question are dropped, and consecutive
    turns of one role are joined, so the turns alternate as the template expects."""
    last = max(i for i, m in enumerate(request.messages) if m.role == "user")
    turns: list[dict] = []
    for m in request.messages[:last] + [Message(role="user", content=question)]:
        text = _text(m).strip()
        text = safety.unrender(text) if m.role == "assistant" else text
        if m.role not in ("user", "assistant") or not text or (not turns and m.role == "assistant"):
            continue
        if turns and turns[-1]["role"] == m.role:
            turns[-1]["content"] += f"\n\n{text}"
        else:
            turns.append({"role": m.role, "content": text})
    return turns


def user_turns(request: ChatRequest) -> list[dict]:
    """The conversation's user and assistant turns as {"role", "content"}: what the safety screen reads (system
    and developer messages are the client's instructions, not what the person said)."""
    return [{"role": m.role, "content": _text(m)} for m in request.messages if m.role in ("user", "assistant")]


def chunk(rid: str, created: int, model: str, delta: dict | None, finish: str | None = None, **extra) -> str:
    """One server-sent event; delta None = OpenAI's closing usage chunk, which has no choices."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
    return f"data: {json.dumps({**body, **extra}, ensure_ascii=False)}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    """OpenAI's token counts: completion_tokens are the tokens the model generated (the disclaimer and the safety
    lines added by code are not counted; a fixed emergency answer counts 0)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(rid: str, created: int, model: str, content: str, finish: str, usage: dict, **extra) -> dict:
    """A whole (not streamed) chat completion with one choice."""
    choice = {"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": None,
              "finish_reason": finish}
    return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": [choice],
            "usage": usage, **extra}


def fields(record: dict) -> dict:
    """The structured safety fields beside the text: clients need not parse the disclaimer out of the message."""
    return {"answer": record["answer"], "disclaimer": record["disclaimer"], "flags": record["flags"],
            **({"sources": record["sources"]} if "sources" in record else {})}
