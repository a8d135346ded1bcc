"""AsyncLLM: one LLMEngine shared by every caller (asyncio streams, plain threads, the OpenAI server),
stepped by a dedicated engine thread, the only one that touches the engine: callers hand requests and
aborts over through a locked inbox; each step's outputs go to the request's sink (an asyncio queue via
call_soon_threadsafe, or a RequestHandle). New requests join the running batch at the next step. The
native forward releases the GIL, so event loops and other threads run while a step runs.
"""
from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from concurrent.futures import Future, InvalidStateError

from .engine import LLMEngine, RequestsFailed
from .model.fetch import DEFAULT_MODEL
from .outputs import RequestOutput
from .sampling_params import SamplingParams

Sink = Callable[[RequestOutput | BaseException], None]  # called on the engine thread only


class RequestHandle(Future):
    """One request submitted from any thread: a concurrent.futures.Future of the final RequestOutput.
    Iterating it yields the cumulative outputs as steps produce them (a slow reader skips to the newest).
    Done callbacks run on the engine thread: keep them short."""

    def __init__(self, llm: AsyncLLM, request_id: str):
        super().__init__()
        self.request_id = request_id
        self._llm = llm
        self._updated = threading.Condition()
        self._latest: RequestOutput | None = None
        self._version = 0  # outputs received so far

    def cancel(self) -> bool:
        """Abort the request; True unless it had already finished. When this returns its KV blocks are
        free (it waits for the engine thread, at most one step)."""
        if self.done():
            return self.cancelled()
        self._llm._request_abort([self.request_id], notify=False, wait=True)
        cancelled = super().cancel()  # False when the request finished before the abort reached it
        with self._updated:
            self._updated.notify_all()
        return cancelled

    def __iter__(self) -> Iterator[RequestOutput]:
        seen = 0
        while True:
            with self._updated:
                self._updated.wait_for(lambda: self._version > seen or self.done())
                out, version = self._latest, self._version
            if version == seen:  # done with nothing new: cancelled, or the engine failed
                if not self.cancelled():
                    self.result()  # raises the engine's error
                return
            seen = version
            yield out
            if out.finished:
                return

    def _deliver(self, item: RequestOutput | BaseException) -> None:  # the engine thread
        try:
            if isinstance(item, BaseException):
                self.set_exception(item)
            else:
                with self._updated:
                    self._latest, self._version = item, self._version + 1
                if item.finished:
                    self.set_result(item)
        except InvalidStateError:  # cancelled meanwhile (only possible from a callback on this thread)
            pass
        with self._updated:
            self._updated.notify_all()


class AsyncLLM:
    """Constructed like LLM, or over an engine with from_engine(); starts at once unless start=False.
    A context manager; shutdown() stops the engine thread."""

    ABORT_HISTORY = 256  # the latest unfinished aborts kept in `aborted` (a server aborts without end)

    def __init__(self, model: str = DEFAULT_MODEL, *, threads: int | None = None, device: str = "cpu",
                 quantization: str | None = None, memory_budget=None, enable_prefix_caching: bool = True,
                 start: bool = True, **engine_args):
        self._attach(LLMEngine(model, threads=threads, device=device, quantization=quantization,
                               memory_budget=memory_budget, enable_prefix_caching=enable_prefix_caching,
                               **engine_args), start)

    @classmethod
    def from_engine(cls, engine: LLMEngine, *, start: bool = True) -> AsyncLLM:
        """Over an existing engine; from then on only the engine thread may touch the engine."""
        self = cls.__new__(cls)
        self._attach(engine, start)
        return self

    def _attach(self, engine: LLMEngine, start: bool) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self._lock = threading.Lock()      # guards everything below up to _streams
        self._adds: list[tuple] = []       # (request_id, prompt, params, arrival_time, sink)
        self._aborts: list[tuple] = []     # (request ids, notify, on_done)
        self._live: set[str] = set()       # request ids queued or running: ids must be unique
        self._in_transit = 0               # taken from the inbox, not yet in the stats snapshot
        self._stopping = self._paused = self._closed = False
        self._wake = threading.Event()
        self._changed = threading.Condition()  # notified each time the engine thread publishes stats
        self._streams: dict[str, Sink] = {}    # request_id -> sink; engine thread only
        self._ids = itertools.count()
        self.stats = engine.stats()  # snapshot refreshed by the engine thread: safe to read anywhere
        self.step_observers: list = []     # called on the engine thread after each step with the engine
        self.error: BaseException | None = None  # set when the engine thread died
        # (request id, tokens it had generated) of the latest unfinished aborts; num_aborted counts them all
        self.aborted: deque[tuple[str, int]] = deque(maxlen=self.ABORT_HISTORY)
        self.num_aborted = 0
        self._thread = threading.Thread(target=self._run, name="tinyvllm-engine", daemon=True)
        if start:
            self.start()

    def get_tokenizer(self):
        return self.tokenizer

    def aborts_since(self, num_aborted: int) -> list[tuple[str, int]]:
        """The aborts after the first num_aborted (an earlier reading of num_aborted), as far as kept."""
        new = min(self.num_aborted - num_aborted, len(self.aborted))
        return list(self.aborted)[len(self.aborted) - new:]

    def start(self) -> AsyncLLM:
        if not self._thread.is_alive() and not self._stopping:
            self._thread.start()
        return self

    def __enter__(self) -> AsyncLLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def num_waiting(self) -> int:
        """Requests accepted but not yet admitted to the running batch."""
        return len(self._adds) + self._in_transit + self.stats["waiting"]

    # ---- asyncio callers -------------------------------------------------------------------------
    def generate(self, prompt, sampling_params: SamplingParams | None = None,
                 request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Queue one request now (inside a running event loop); yields its cumulative RequestOutput after
        every step that changed it (a reader that falls behind skips to the newest). Leaving the loop early
        aborts the request and frees its blocks. ValueError at once when request_id is in use."""
        return self._submit_async([prompt], sampling_params, [request_id], tagged=False)

    def generate_batch(self, prompts: list, sampling_params: SamplingParams | None = None,
                       request_ids: list[str | None] | None = None) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Several prompts queued together (one engine request each, with the same params); yields
        (prompt index, RequestOutput). Leaving early aborts every request that has not finished."""
        return self._submit_async(prompts, sampling_params, request_ids, tagged=True)

    def _submit_async(self, prompts, sampling_params, request_ids, tagged: bool):
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        latest: dict[int, RequestOutput | BaseException] = {}  # prompt index -> newest item not yet read

        def keep_newest(k, item):  # on the loop's thread
            # Outputs are cumulative: a reader that fell behind needs only the newest, so one that reads
            # slowly (or never) holds one output per request, not one per step.
            if k not in latest:
                queue.put_nowait(k)
            latest[k] = item

        def sink_for(k: int) -> Sink:
            def put(item):
                try:
                    loop.call_soon_threadsafe(keep_newest, k, item)
                except RuntimeError:  # that event loop is closed: nobody is listening any more
                    pass
            return put

        rids = self._enqueue(prompts, sampling_params, request_ids, sink_for)
        return self._outputs(queue, latest, rids, tagged)

    async def _outputs(self, queue: asyncio.Queue, latest: dict, rids: list[str], tagged: bool):
        running = set(range(len(rids)))
        try:
            while running:
                k = await queue.get()
                out = latest.pop(k)
                if isinstance(out, BaseException):
                    raise out
                if out.finished:
                    running.discard(k)
                yield (k, out) if tagged else out
        finally:
            if running:  # no await here: this also runs while the caller is being cancelled
                self._request_abort([rids[k] for k in running], notify=False)

    async def abort(self, request_id: str | Iterable[str]) -> None:
        """Stop the request(s) now. When this returns their blocks are free, and each one's generate()
        stream (or handle) ends with a final output whose finish_reason is "abort". Unknown or finished
        ids are ignored."""
        rids = [request_id] if isinstance(request_id, str) else list(request_id)
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def on_done():
            try:
                loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))
            except RuntimeError:
                pass
        self._request_abort(rids, notify=True, on_done=on_done)
        await done

    # ---- plain threads ---------------------------------------------------------------------------
    def submit(self, prompt, sampling_params: SamplingParams | None = None,
               request_id: str | None = None) -> RequestHandle:
        """Queue one request from any thread; returns its RequestHandle at once."""
        with self._lock:
            rid = self._fresh_id() if request_id is None else str(request_id)
        handle = RequestHandle(self, rid)
        self._enqueue([prompt], sampling_params, [rid], lambda _k: handle._deliver)
        return handle

    # ---- the inbox (any thread) ------------------------------------------------------------------
    def _fresh_id(self) -> str:  # with self._lock held
        while (rid := str(next(self._ids))) in self._live:
            pass
        return rid

    def _enqueue(self, prompts: list, params: SamplingParams | None, request_ids, sink_for) -> list[str]:
        params = params or SamplingParams()
        now = time.monotonic()  # deadlines count from here
        with self._lock:
            if self._stopping or self._closed or self.error is not None:
                raise RuntimeError(f"the engine failed: {self.error!r}" if self.error else "the engine is shut down")
            rids = [str(r) if r is not None else self._fresh_id() for r in (request_ids or [None] * len(prompts))]
            taken = [r for r in rids if r in self._live] + [r for i, r in enumerate(rids) if r in rids[:i]]
            if taken:
                raise ValueError(f"request id {taken[0]!r} is already in use")
            self._live.update(rids)
            self._adds += [(rid, p, params, now, sink_for(k)) for k, (rid, p) in enumerate(zip(rids, prompts))]
        self._wake.set()
        return rids

    def _request_abort(self, request_ids: list[str], *, notify: bool, on_done=lambda: None,
                       wait: bool = False) -> None:
        """notify: hand each request's final "abort" output to its sink. on_done runs (on the engine
        thread) once the blocks are free; wait blocks until then (not on the engine thread itself)."""
        event = None
        if wait and self._thread.is_alive() and threading.current_thread() is not self._thread:
            event = threading.Event()
            on_done = event.set
        with self._lock:
            closed = self._closed
            if not closed:
                self._aborts.append((list(request_ids), notify, on_done))
        if closed:  # the engine thread is gone: nothing runs any more
            return on_done()
        self._wake.set()
        if event is not None:
            event.wait()

    def pause(self) -> None:
        """Stop stepping (aborts and shutdown still go through); new requests wait in the inbox, where
        num_waiting counts them. Lets a caller line up a batch or a full queue exactly."""
        with self._lock:
            self._paused = True

    def resume(self) -> None:
        with self._lock:
            self._paused = False
        self._wake.set()

    def wait_until(self, predicate, timeout: float = 600.0) -> bool:
        """Block until predicate(self) holds, re-checked whenever the engine thread publishes new stats
        (after taking requests over, after each step); False if timeout seconds pass first."""
        with self._changed:
            return self._changed.wait_for(lambda: predicate(self), timeout)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Abort whatever still runs (its streams and handles get a RuntimeError), then stop the engine
        thread."""
        with self._lock:
            self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        elif not self._closed:  # never started: fail what waits in the inbox
            self._close_inbox(RuntimeError("the engine is shut down"))

    # ---- the engine thread -----------------------------------------------------------------------
    def _end_stream(self, rid: str, item) -> None:
        """Hand a stream its last item (a finished output, or an error) and forget it."""
        sink = self._streams.pop(rid, None)
        with self._lock:
            self._live.discard(rid)
        if sink is not None and item is not None:
            sink(item)

    def _abort(self, rid: str, notify: bool) -> None:
        out = self._abort_in_engine(rid)
        self._end_stream(rid, out if notify else None)

    def _abort_in_engine(self, rid: str) -> RequestOutput | None:
        out = self.engine.abort(rid)
        if out is not None:
            self.aborted.append((rid, sum(len(c.token_ids) for c in out.outputs)))
            self.num_aborted += 1
        return out

    def _publish(self) -> None:
        with self._changed:  # requests taken from the inbox are in these stats: none in transit any more
            self.stats, self._in_transit = self.engine.stats(), 0
            self._changed.notify_all()

    def _close_inbox(self, error: BaseException) -> None:
        """The engine thread is gone (or never ran): fail every stream and whatever waits in the inbox."""
        with self._lock:
            self._closed = True
            adds, aborts, self._adds, self._aborts = self._adds, self._aborts, [], []
            self._live.clear()
        for rid in list(self._streams):
            self._streams.pop(rid)(error)
        for _, _, _, _, sink in adds:
            sink(error)
        for *_, on_done in aborts:
            on_done()

    def _run(self) -> None:
        eng, aborts = self.engine, []
        try:
            while True:
                with self._lock:
                    paused = self._paused and not self._stopping
                    aborts, stopping, self._aborts = self._aborts, self._stopping, []
                    if paused:  # only what is being aborted leaves the inbox (to end its stream properly)
                        gone = {rid for rids, _, _ in aborts for rid in rids}
                        adds = [a for a in self._adds if a[0] in gone]
                        self._adds = [a for a in self._adds if a[0] not in gone]
                    else:
                        adds, self._adds = self._adds, []
                    self._in_transit = len(adds)
                for rid, prompt, params, arrival, sink in adds:
                    self._streams[rid] = sink
                    try:
                        eng.add_request(rid, prompt, params, arrival_time=arrival)
                    except Exception as e:  # a bad prompt fails its own stream, nothing else
                        self._end_stream(rid, e)
                for rids, notify, _ in aborts:
                    for rid in rids:
                        self._abort(rid, notify)
                if stopping:  # abort what runs; _close_inbox tells its streams why
                    for rid in list(self._streams):
                        self._abort_in_engine(rid)
                self._publish()
                for *_, on_done in aborts:  # after the publish: stats show the freed blocks
                    on_done()
                if stopping:
                    self._close_inbox(RuntimeError("the engine is shut down"))
                    return
                if paused or not eng.has_unfinished_requests():
                    self._wake.wait()
                    self._wake.clear()
                    continue
                steps = eng.num_steps
                try:
                    outs = eng.step()
                except RequestsFailed as e:  # its requests are ended and freed: tell them why, go on
                    outs = e.outputs
                    for rid in e.request_ids:
                        self._end_stream(rid, RuntimeError(f"the request failed in the engine: {e.cause!r}"))
                self._publish()
                if eng.num_steps > steps:
                    for observe in self.step_observers:
                        observe(eng)
                for out in outs:
                    if out.finished:
                        self._end_stream(out.request_id, out)
                    elif out.request_id in self._streams:
                        self._streams[out.request_id](out)
        except BaseException as e:  # a broken step must not leave every caller waiting forever
            self.error = e
            self._close_inbox(RuntimeError(f"the engine failed: {e!r}"))
            for *_, on_done in aborts:  # taken from the inbox before the failure (a second call is harmless)
                on_done()
            raise
