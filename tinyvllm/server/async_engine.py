"""AsyncEngine: one LLMEngine shared by every connection, stepped by a dedicated thread.

The engine is not thread-safe, so only the engine thread touches it: request handlers hand new
requests and aborts over through a locked inbox, and the engine thread pushes each step's
RequestOutputs into the handlers' asyncio queues with loop.call_soon_threadsafe. New requests join
the running batch at the next step (continuous batching across clients). The native forward pass
releases the GIL, so the event loop keeps serving HTTP while a step runs.
"""
import asyncio
import itertools
import threading
import time
from collections.abc import AsyncIterator

from ..engine import LLMEngine
from ..outputs import RequestOutput
from ..sampling_params import SamplingParams


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._lock = threading.Lock()
        self._adds: list[tuple] = []      # (request_id, prompt, params, arrival_time, loop, queue, tag)
        self._aborts: list[str] = []
        self._in_transit = 0              # taken from the inbox, not yet in the stats snapshot
        self._wake = threading.Event()
        self._stopping = False
        self._paused = False
        self._changed = threading.Condition()  # notified each time the engine thread publishes stats
        self._streams: dict[str, tuple] = {}  # request_id -> (loop, queue, tag); engine thread only
        self._ids = itertools.count()
        self.stats = engine.stats()  # snapshot refreshed by the engine thread: safe to read anywhere
        self.step_observers: list = []    # called on the engine thread after each step with the engine
        self.error: BaseException | None = None  # set when the engine thread died
        self.aborted: list[tuple[str, int]] = []  # (request id, tokens it had generated) per unfinished abort
        self._thread = threading.Thread(target=self._run, name="tinyvllm-engine", daemon=True)

    # ---- called from request handlers (any thread) ------------------------------------------
    def start(self) -> "AsyncEngine":
        if not self._thread.is_alive() and not self._stopping:
            self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def num_waiting(self) -> int:
        """Requests accepted but not yet admitted to the running batch."""
        return len(self._adds) + self._in_transit + self.stats["waiting"]

    def generate(self, prompts: list, params: SamplingParams) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Queue every prompt as its own engine request now (so admission control sees it at once);
        the returned iterator yields (prompt index, RequestOutput) as steps produce them. Leaving it
        early (client gone, cancellation) aborts whatever has not finished."""
        queue, rids, now = asyncio.Queue(), [f"{next(self._ids)}" for _ in prompts], time.monotonic()
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._stopping or self.error is not None:
                raise RuntimeError(f"the engine failed: {self.error!r}" if self.error else "shutting down")
            self._adds += [(rid, p, params, now, loop, queue, k) for k, (rid, p) in enumerate(zip(rids, prompts))]
        self._wake.set()
        return self._outputs(queue, rids)

    async def _outputs(self, queue: asyncio.Queue, rids: list[str]):
        running = set(range(len(rids)))
        try:
            while running:
                k, out = await queue.get()
                if isinstance(out, BaseException):
                    raise out
                if out.finished:
                    running.discard(k)
                yield k, out
        finally:
            if running:
                self.abort([rids[k] for k in running])

    def abort(self, request_ids: list[str]) -> None:
        with self._lock:
            gone = set(request_ids)  # still in the inbox: never reaches the engine
            self._adds = [a for a in self._adds if a[0] not in gone]
            self._aborts += request_ids
        self._wake.set()

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
        """Abort whatever still runs, then stop the engine thread."""
        with self._lock:
            self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ---- the engine thread ------------------------------------------------------------------
    def _deliver(self, rid: str, item) -> None:
        loop, queue, tag = self._streams[rid]
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (tag, item))
        except RuntimeError:  # that event loop is closed: nobody is listening any more
            pass

    def _publish(self) -> None:
        with self._changed:  # requests taken from the inbox are in these stats: none in transit any more
            self.stats, self._in_transit = self.engine.stats(), 0
            self._changed.notify_all()

    def _run(self) -> None:
        eng = self.engine
        try:
            while True:
                with self._lock:
                    paused = self._paused and not self._stopping
                    adds, aborts, stopping = [] if paused else self._adds, self._aborts, self._stopping
                    self._adds = self._adds if paused else []
                    self._aborts, self._in_transit = [], len(adds)
                for rid, prompt, params, arrival, loop, queue, tag in adds:
                    self._streams[rid] = (loop, queue, tag)
                    try:
                        eng.add_request(rid, prompt, params, arrival_time=arrival)
                    except Exception as e:  # handlers validate first; this is the last line of defence
                        self._deliver(rid, e)
                        del self._streams[rid]
                for rid in aborts + (list(self._streams) if stopping else []):
                    if rid in self._streams and stopping:
                        self._deliver(rid, RuntimeError("the server is shutting down"))
                    self._streams.pop(rid, None)
                    req = eng.requests.get(rid)
                    if req is not None and eng.abort(rid):
                        self.aborted.append((rid, sum(len(s.output_token_ids) for s in req.seqs)))
                self._publish()
                if stopping:
                    return
                if paused or not eng.has_unfinished_requests():
                    self._wake.wait()
                    self._wake.clear()
                    continue
                steps = eng.num_steps
                outs = eng.step()
                self._publish()
                if eng.num_steps > steps:
                    for observe in self.step_observers:
                        observe(eng)
                for out in outs:
                    if out.request_id in self._streams:
                        self._deliver(out.request_id, out)
                        if out.finished:
                            del self._streams[out.request_id]
        except BaseException as e:  # a broken step must not leave every client waiting forever
            self.error = e
            for rid in list(self._streams):
                self._deliver(rid, RuntimeError(f"the engine failed: {e!r}"))
            self._streams.clear()
            raise
