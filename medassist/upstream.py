"""A serving engine (vLLM, SGLang, llama.cpp's server; or ours, raw.py) that generates for `serve --upstream URL`
through its OpenAI /v1/completions.

The gateway keeps the whole safety layer in our code (screen before the queue, the one template, the guard, the
closing lines and the disclaimer); the engine is only sent the prompt text prompts.py renders and continues it.
Emergencies and crises never reach it.
Plain http.client, no HTTP library: the generation runs in a worker thread anyway, and closing the socket from a
watcher thread is what cancels a request in the engine when our client leaves.
"""

import http.client
import json
import logging
import socket
import threading
from itertools import chain
from types import SimpleNamespace
from urllib.parse import urlsplit

from medassist import UserError
from medassist.generate import Outcome, StopAt, read_adapter_meta
from medassist.openai_api import ApiError
from medassist.prompts import STOP_TOKENS, check_template, format_conversation, stop_ids
from medassist.sampling import Sampling

log = logging.getLogger("medassist.serve")

TIMEOUT = 30.0  # seconds for the engine's first token and between tokens (a busy vLLM queues, a cold one compiles)


class Upstream:
    """The engine at `url` (its OpenAI base URL, e.g. http://localhost:8000/v1) serving `model`. In place of a local
    model, generate.stream_answer calls `start` with the prompt text and reads `config` for the context length."""

    def __init__(self, url: str, model: str, timeout: float = TIMEOUT, stop_token_ids=(), context: int = 8192,
                 api_key: str | None = None):
        self.url, self.model, self.timeout = url.rstrip("/"), model, timeout
        self.stop_token_ids, self.api_key = list(stop_token_ids), api_key
        self.config = SimpleNamespace(max_position_embeddings=context)  # what generate.context_length reads

    def body(self, prompt: str, sampling: Sampling) -> dict:
        """The request: our turn markers as stop strings and, for vLLM and SGLang, as token ids too (an engine that
        skips special tokens in its text never sees the strings); engines ignore the fields they do not know."""
        return {"model": self.model, "prompt": prompt, "stream": True, "stream_options": {"include_usage": True},
                "max_tokens": sampling.max_new_tokens, "temperature": sampling.temperature, "top_p": sampling.top_p,
                "seed": sampling.seed, "repetition_penalty": sampling.repetition_penalty,
                "stop": list(STOP_TOKENS), "stop_token_ids": self.stop_token_ids}

    def start(self, messages: list[dict], ids, sampling: Sampling, stop: threading.Event) -> "Completion":
        return Completion(self, format_conversation(messages), sampling, stop)  # text: the engine tokenizes

    def connection(self, timeout: float) -> http.client.HTTPConnection:
        u = urlsplit(self.url)
        kind = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
        return kind(u.hostname, u.port, timeout=timeout)

    def headers(self) -> dict:
        auth = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return {"Content-Type": "application/json", "Accept": "text/event-stream", **auth}

    def down(self, e: Exception) -> ApiError:
        return ApiError(502, f"upstream {self.url} is not reachable ({type(e).__name__}: {e}); is the engine "
                             f"running?", kind="upstream_error")

    def slow(self) -> ApiError:
        return ApiError(504, f"upstream {self.url} sent nothing for {self.timeout:g} s (--upstream-timeout)",
                        kind="upstream_timeout")


class Completion:
    """One streamed completion, shaped like generate.Generation: `streamer` yields text pieces, `halt` (a stop
    string was seen) or `stop` (our client left) closes the connection, which ends the request in the engine too,
    and `join()` says how it ended. Down, refused or slow before the first token: ApiError 502/504, raised here,
    before stream_answer shows anything."""

    def __init__(self, upstream: Upstream, prompt: str, sampling: Sampling, stop: threading.Event):
        self.upstream, self.stop, self.halt, self.closed = upstream, stop, threading.Event(), threading.Event()
        self.tokens, self.pieces, self.finish = None, 0, "stop"
        self.cut = StopAt(STOP_TOKENS)  # an engine that ignores our stop strings still never shows a next turn
        self.conn = upstream.connection(upstream.timeout)
        threading.Thread(target=self._watch, daemon=True, name="upstream-watch").start()
        try:
            self.response = self._open(prompt, sampling)
            self.events = self._events()
            self.first = next(self.events, None)  # within the timeout, or a 504 while our client can still get one
        except BaseException:
            self.close()
            raise
        self.streamer = self._pieces()

    def _open(self, prompt: str, sampling: Sampling) -> http.client.HTTPResponse:
        upstream = self.upstream
        try:
            self.conn.request("POST", f"{urlsplit(upstream.url).path}/completions",
                              json.dumps(upstream.body(prompt, sampling)), upstream.headers())
            response = self.conn.getresponse()
        except TimeoutError:
            raise upstream.slow() from None
        except (OSError, http.client.HTTPException) as e:
            raise upstream.down(e) from None
        if response.status != 200:
            raise ApiError(502, f"upstream {upstream.url} answered {response.status}: "
                                f"{_error_text(response.read(4000))}", kind="upstream_error")
        return response

    def _watch(self) -> None:
        """Shut the socket when our client leaves, also while the engine is silent (queued, or slow): the read
        in the worker thread ends at once, and the engine sees the disconnect and stops generating."""
        while not self.closed.wait(0.05):
            sock = self.conn.sock  # None until connected, and again once the worker thread closed it
            if (self.stop.is_set() or self.halt.is_set()) and sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return

    def _events(self):
        """The JSON of each server-sent `data:` event, until [DONE] or the end of the body."""
        while True:
            try:
                line = self.response.readline()
            except TimeoutError:
                raise self.upstream.slow() from None
            except (OSError, http.client.HTTPException) as e:
                if self.stop.is_set() or self.halt.is_set():  # our watcher shut it
                    return
                raise self.upstream.down(e) from None
            if not line:
                return
            data = line.strip()[5:].strip() if line.startswith(b"data:") else None
            if data == b"[DONE]":
                return
            if data:
                try:
                    event = json.loads(data)
                except ValueError:
                    raise ApiError(502, f"upstream {self.upstream.url} sent an event that is not JSON: "
                                        f"{_error_text(data)}", kind="upstream_error") from None
                if not isinstance(event, dict) or "error" in event:
                    raise ApiError(502, f"upstream {self.upstream.url} failed mid-answer: "
                                        f"{_error_text(data)}", kind="upstream_error")
                yield event

    def _pieces(self):
        try:
            for event in chain([self.first] if self.first else [], self.events):
                if self.stop.is_set() or self.halt.is_set():
                    return
                self.tokens = (event.get("usage") or {}).get("completion_tokens", self.tokens)
                for choice in event.get("choices") or []:
                    self.finish = choice.get("finish_reason") or self.finish
                    self.pieces += bool(choice.get("text"))
                    if text := self.cut.feed(choice.get("text") or ""):
                        yield text
                    if self.cut.hit:
                        return
            if rest := self.cut.close():  # text held back as a possible start of a turn marker that was not one
                yield rest
        finally:
            self.close()

    def close(self) -> None:
        self.closed.set()
        self.conn.close()

    def join(self) -> Outcome:
        self.close()
        cut = self.finish == "length" and not self.halt.is_set() and not self.cut.hit
        # engines that send no usage stream one token per event (vLLM, llama.cpp): count those
        return Outcome(self.tokens if self.tokens is not None else self.pieces, "length" if cut else "stop")


def _error_text(raw: bytes) -> str:
    """The engine's error message from an OpenAI error body (or the body's start), on one line."""
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    text = (error.get("message") if isinstance(error, dict) else error) or raw.decode(errors="replace")
    return " ".join(str(text).split())[:300]


def probe(upstream: Upstream, timeout: float = 5.0) -> list[dict]:
    """The engine's /models entries; UserError when it cannot be reached."""
    conn = upstream.connection(timeout)
    try:
        conn.request("GET", f"{urlsplit(upstream.url).path}/models", headers=upstream.headers())
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise UserError(f"upstream {upstream.url}/models answered {response.status}: {_error_text(body)}")
        return json.loads(body).get("data") or []
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise UserError(f"upstream {upstream.url} is not reachable ({type(e).__name__}: {e})") from None
    finally:
        conn.close()


def _engine_model(upstream: Upstream, name: str | None) -> tuple[str, int | None]:
    """(the model to ask for, the engine's context length if it says): the named one, else its only model."""
    try:
        models = probe(upstream)
    except UserError as e:
        if name is None:
            raise UserError(f"{e}; start the engine first, or name its model with --upstream-model to start "
                            f"without asking it") from None
        log.warning("%s; serving anyway, requests get a 502 until it answers", e)
        return name, None
    ids = [m.get("id") for m in models]
    if name is None and len(ids) != 1:
        raise UserError(f"upstream {upstream.url} serves {len(ids)} models ({', '.join(map(str, ids)) or 'none'}); "
                        f"pick one with --upstream-model (with vLLM: the name given to --lora-modules)")
    if name is not None and name not in ids:
        log.warning("upstream %s lists no model %r (it lists %s)", upstream.url, name, ", ".join(map(str, ids)))
    lengths = [m["max_model_len"] for m in models if isinstance(m.get("max_model_len"), int)]
    return name or ids[0], min(lengths, default=None)


def _config_context(source: str) -> int:
    """The context length in the base model's config (no weights load)."""
    from medassist.loading import load_config

    config = load_config(source)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(getattr(text, "max_position_embeddings", 8192))


def connect(args) -> tuple[Upstream, object, str]:
    """(the engine, the tokenizer that counts its prompts, the base model's name) for `serve --upstream`: the
    tokenizer of --base-model, else the adapter's base (only its medassist.json is read here, for the template
    check: the engine holds the weights), else the embedded one."""
    from medassist.loading import load_tokenizer

    meta = read_adapter_meta(args.adapter) if args.adapter else {}
    if args.adapter and not args.allow_template_mismatch:
        check_template(meta.get("template"), args.adapter, "Serve an adapter trained with this medassist version, or "
                                                           "pass --allow-template-mismatch")
    base = args.base_model or meta.get("base_model") or "embedded"
    if base == "embedded":
        log.warning("no --base-model or --adapter: prompts are counted, and stop ids taken, with the embedded "
                    "gemma-3-270m's tokenizer; name the engine's base (e.g. --base-model google/gemma-2b) to match it")
    tokenizer = load_tokenizer(base)
    engine = Upstream(args.upstream, args.upstream_model or "", args.upstream_timeout, stop_ids(tokenizer),
                      _config_context(base), args.upstream_api_key)
    engine.model, engine_context = _engine_model(engine, args.upstream_model)
    if engine_context:  # a vLLM started with a smaller --max-model-len refuses longer prompts: fit them to it
        engine.config.max_position_embeddings = min(engine.config.max_position_embeddings, engine_context)
    log.info("prompts counted with the tokenizer of %s (its stop ids %s), context %d", base, engine.stop_token_ids,
             engine.config.max_position_embeddings)
    return engine, tokenizer, base
