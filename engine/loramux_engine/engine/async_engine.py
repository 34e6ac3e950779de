"""Runs an ``LLMEngine`` on a background thread for asyncio callers.

The loop thread alone touches the engine; callers hand it commands through a
queue and receive outputs on per-request asyncio queues of their own loop.
Cancelling the task that consumes ``generate`` aborts the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable

from loramux_engine.config import EngineConfig
from loramux_engine.engine.llm_engine import LLMEngine
from loramux_engine.lora.ref import AdapterRef
from loramux_engine.outputs import EngineStats, RequestOutput
from loramux_engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_Item = RequestOutput | BaseException


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue[tuple[str, Callable[[], None]]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[_Item]]] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._stats = engine.stats()

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncLLMEngine:
        """Build the engine on a thread of its own that exits once it is built.

        Every thread that runs a parallel torch op keeps an OpenMP team of its own; once
        the teams' threads outnumber the cores, libgomp stops spin-waiting between
        parallel regions, and every op of every step pays a futex wake-up. Built on the
        caller's (usually the server's main) thread, the engine's loading left a second
        team beside the loop thread's: measured 330 against 195 ms for an 8-token
        completion on 2 cores. A finished thread's team goes with it.
        """
        built: list[LLMEngine] = []
        errors: list[BaseException] = []

        def build() -> None:
            try:
                built.append(LLMEngine(config))
            except BaseException as e:
                errors.append(e)

        thread = threading.Thread(target=build, name="loramux-engine-build")
        thread.start()
        thread.join()
        if errors:
            raise errors[0]
        return cls(built[0])

    @property
    def tokenizer(self) -> object:
        return self.engine.tokenizer

    def start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="loramux-engine", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stopping = True
        self._wake.set()
        thread.join()
        error = RuntimeError("engine shut down")
        for request_id in list(self._streams):
            self._deliver(request_id, error)

    def stats(self) -> EngineStats:
        return self._stats

    def abort(self, request_id: str) -> None:
        self._submit(request_id, lambda: self.engine.abort(request_id))

    def drop_adapter(self, ref: AdapterRef) -> None:
        """Forget a deleted adapter version; runs on the engine thread, between steps."""
        self._submit("", lambda: self.engine.drop_adapter(ref))

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        fairness_key: str = "",
        priority: int = 0,
        adapter: object | None = None,
    ) -> AsyncIterator[RequestOutput]:
        self.engine.validate_request(prompt_token_ids, params, adapter)
        stream: asyncio.Queue[_Item] = asyncio.Queue()
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request_id {request_id!r} is already streaming")
            self._streams[request_id] = (asyncio.get_running_loop(), stream)
        self.start()
        self._submit(
            request_id,
            lambda: self.engine.add_request(
                request_id, prompt_token_ids, params, fairness_key, priority, adapter
            ),
        )
        finished = False
        try:
            while not finished:
                item = await stream.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if not finished:  # nobody listens any more, so no abort output either
                self._submit(request_id, lambda: self.engine.abort(request_id, emit_output=False))

    def _submit(self, request_id: str, command: Callable[[], None]) -> None:
        self._commands.put((request_id, command))
        self._wake.set()

    def _deliver(self, request_id: str, item: _Item) -> None:
        with self._lock:
            target = self._streams.get(request_id)
        if target is not None:
            loop, stream = target
            # a closed loop means nobody is listening any more
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stream.put_nowait, item)

    def _loop(self) -> None:
        while not self._stopping:
            while True:
                try:
                    request_id, command = self._commands.get_nowait()
                except queue.Empty:
                    break
                try:
                    command()
                except Exception as e:  # a refused request fails only its own stream
                    self._deliver(request_id, e)
            if not self.engine.has_unfinished():
                self._stats = self.engine.stats()
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:
                # A request's own failure (its logits, its sampling, its adapter) never
                # gets here: the step isolates it. This is the engine's, so every request's.
                logger.exception("engine step failed; failing the requests in flight")
                self._fail_all(e)
                continue
            for out in outputs:
                # a request that failed on its own (its adapter did not load, its logits
                # were not finite) raises its error to its own stream only
                self._deliver(out.request_id, out.error or out)
            self._stats = self.engine.stats()

    def _fail_all(self, error: Exception) -> None:
        for request_id in self.engine.unfinished_request_ids():
            self.engine.abort(request_id, emit_output=False)
            self._deliver(request_id, error)
