"""The generation queue of `python -m medassist serve`: a Job carries one request's pieces from a generation thread
to its event loop; the Worker runs jobs, at most `max_queue` waiting or running.

Shared by the chat server and the gateway in front of an engine (serve.py, upstream.py) and the raw engine (raw.py).
"""

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

from fastapi.responses import StreamingResponse

from medassist.generate import Outcome, stream_answer
from medassist.openai_api import ApiError
from medassist.sampling import Sampling

log = logging.getLogger("medassist.serve")

DONE = object()


class Job:
    """One request's generation: pieces travel from the worker thread to the request's event loop."""

    def __init__(self, question: str | list[dict], sampling: Sampling, screening=None, stops=()):
        self.question, self.sampling, self.screening, self.stops = question, sampling, screening, list(stops)
        self.outcome = Outcome()  # tokens generated and finish_reason, filled in before the record is put
        self.stop = threading.Event()  # set when the client goes away: generation ends after the current token
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.ahead: list = []  # what `first` took off the queue, given back first by `items`

    def put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop closed (server shutting down): nobody is listening
            pass

    async def first(self, request) -> None:
        """Wait for the first piece (or the end); an error before it is raised here, while the response can still
        be an HTTP error (a gateway's 502/504) rather than an event in a stream that already said 200."""
        async for item in self.items(request, keep_going=True):
            self.ahead.append(item)
            return
        self.ahead.append(DONE)

    async def items(self, request, keep_going: bool = False):
        """The pieces and the final record as they come; stops the generation when the client disconnects
        (`keep_going`: not when this read ends early, as `first`'s does)."""
        try:
            while True:
                if self.ahead:
                    item = self.ahead.pop(0)
                else:
                    try:
                        item = await asyncio.wait_for(self.queue.get(), timeout=0.5)
                    except asyncio.TimeoutError:
                        if await request.is_disconnected():
                            self.stop.set()
                            return
                        continue
                if item is DONE:
                    return
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:  # also on cancellation, when Starlette notices the disconnect first
            if not keep_going:
                self.stop.set()


class Worker:
    """Runs jobs in `threads` threads (1: one answer at a time, first come first served); at most `max_queue`
    requests wait or run. `produce` makes a job's pieces: here `generate.stream_answer`."""

    def __init__(self, model, tokenizer, model_name: str, adapter: str | None, max_queue: int, index=None,
                 threads: int = 1):
        self.model, self.tokenizer, self.model_name, self.adapter = model, tokenizer, model_name, adapter
        self.index = index  # a retrieval.Index: answers from its passages, with their sources
        self.max_queue, self.busy, self.stopped = max_queue, 0, 0  # stopped: ended early, their client left
        self.lock = threading.Lock()
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="generate")

    def submit(self, job: Job) -> None:
        with self.lock:
            full = self.busy >= self.max_queue
            self.busy += not full  # _run gives the slot back
        if full:
            raise ApiError(503, f"server busy: {self.max_queue} requests are already waiting; retry shortly",
                           kind="server_busy")
        self.executor.submit(self._run, job)

    def produce(self, job: Job) -> Iterator:
        return stream_answer(self.model, self.tokenizer, job.question, job.sampling, self.model_name, self.adapter,
                             job.stop, job.screening, job.stops, job.outcome, self.index)

    def _run(self, job: Job) -> None:  # in a worker thread
        stopped = False
        try:
            if job.stop.is_set():  # the client left while queued
                stopped = True
                return
            for item in self.produce(job):
                job.put(item)
            stopped = job.stop.is_set()  # before DONE: a client that got everything has not set it yet
        except ApiError as e:  # the client's answer (an engine down or slow: 502/504); no traceback for it
            log.warning("generation failed: %s", e.message)
            job.put(e)
        except Exception as e:  # a bug or an out-of-memory: this request fails, the server goes on
            log.exception("generation failed")
            job.put(e)
        finally:
            with self.lock:
                self.busy -= 1
                self.stopped += stopped
            job.put(DONE)


class Stream(StreamingResponse):
    """A StreamingResponse that stops its job however it ends, even when cancelled before the first event."""

    def __init__(self, job: Job, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.job = job

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.stop.set()
