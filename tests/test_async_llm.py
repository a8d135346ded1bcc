"""AsyncLLM on the reference model: asyncio callers and plain-thread handles share one engine thread
and get what they get alone; abort, cancel and deadlines end requests and free every KV block; a
deadline is met within one engine step of its time."""
import asyncio
import threading
import time
from concurrent.futures import CancelledError, wait

import pytest

from tinyvllm import AsyncLLM, LLMEngine, SamplingParams
from run_alone import offline

GREEDY = dict(temperature=0, ignore_eos=True)
SUBJECTS = ["The story", "My favourite colour", "The answer to the question", "A good name for a dog", "Once"]
PROMPTS = [f"{SUBJECTS[i % len(SUBJECTS)]} number {i} is" for i in range(50)]
MAX_TOKENS = [2 + i % 5 for i in range(50)]  # 2..6: callers finish at different steps


@pytest.fixture(scope="module")
def engine(reference_gguf_path):
    return LLMEngine(str(reference_gguf_path), threads=2, max_model_len=512, max_num_seqs=64)


@pytest.fixture(scope="module")
def alone(engine):
    """Each prompt's tokens when it runs by itself, before the engine thread owns the engine."""
    return [offline(engine, p, SamplingParams(max_tokens=n, **GREEDY)).outputs[0].token_ids
            for p, n in zip(PROMPTS, MAX_TOKENS)]


@pytest.fixture(scope="module")
def llm(engine, alone):
    with AsyncLLM.from_engine(engine) as a:
        yield a


@pytest.fixture(scope="module")
def batch_sizes(llm):
    """Sequences in every engine step, recorded on the engine thread."""
    sizes = []
    llm.step_observers.append(lambda eng: sizes.append(eng.last_batch_size))
    return sizes


def idle(a):
    s = a.stats
    return not s["running"] and not a.num_waiting and s["blocks_free"] == s["blocks_total"]


def assert_pool_full(llm):
    """Nothing runs or waits and every KV block is free (the timeout only catches a hang)."""
    assert llm.wait_until(idle, timeout=300), llm.stats
    blocks = llm.engine.scheduler.blocks
    assert blocks.num_free_blocks == blocks.num_blocks and not llm.engine.has_unfinished_requests()


def check_stream(outs):
    """A stream's outputs grow: each one's text and tokens extend the previous ones; only the last is finished."""
    assert outs and outs[-1].finished and not any(o.finished for o in outs[:-1])
    for a, b in zip(outs, outs[1:]):
        assert b.outputs[0].text.startswith(a.outputs[0].text)
        assert b.outputs[0].token_ids[:len(a.outputs[0].token_ids)] == a.outputs[0].token_ids


# ---- many callers, one batch ------------------------------------------------------------------------------
def test_50_concurrent_async_callers_equal_alone(llm, alone, batch_sizes):
    async def caller(i):
        outs = [o async for o in llm.generate(PROMPTS[i], SamplingParams(max_tokens=MAX_TOKENS[i], **GREEDY),
                                              request_id=f"caller-{i}")]
        check_stream(outs)
        assert {o.request_id for o in outs} == {f"caller-{i}"}
        return outs[-1]

    async def main():
        llm.pause()  # line all 50 up first, so they share steps however fast the callers start
        try:
            tasks = [asyncio.create_task(caller(i)) for i in range(50)]
            await asyncio.sleep(0)
            assert await asyncio.to_thread(llm.wait_until, lambda a: a.num_waiting == 50, 300)
        finally:
            llm.resume()
        return await asyncio.gather(*tasks)

    assert_pool_full(llm)
    steps = len(batch_sizes)
    finals = asyncio.run(main())
    assert [f.outputs[0].token_ids for f in finals] == alone
    assert [f.outputs[0].finish_reason for f in finals] == ["length"] * 50
    assert max(batch_sizes[steps:]) == 50  # they really ran together
    assert_pool_full(llm)


def test_bad_requests_fail_alone(llm, alone):
    async def main():
        with pytest.raises(ValueError, match="empty"):
            async for _ in llm.generate({"prompt_token_ids": []}, SamplingParams(max_tokens=2)):
                pass
        gen = llm.generate(PROMPTS[0], SamplingParams(max_tokens=MAX_TOKENS[0], **GREEDY), request_id="dup")
        with pytest.raises(ValueError, match="already in use"):
            llm.generate(PROMPTS[1], SamplingParams(max_tokens=2), request_id="dup")
        return [o async for o in gen][-1]

    assert asyncio.run(main()).outputs[0].token_ids == alone[0]  # the engine goes on serving
    assert_pool_full(llm)


# ---- abort, cancel, deadline: the pool is full again --------------------------------------------------------
def test_abort_and_cancellation_free_every_block(llm):
    long = SamplingParams(max_tokens=400, **GREEDY)

    async def collect(rid):
        return [o async for o in llm.generate(f"Request {rid} tells a story", long, request_id=rid)]

    async def main():
        before = llm.stats["generated_tokens"]
        streams = {rid: asyncio.create_task(collect(rid)) for rid in ("a", "b", "c")}
        dropped = asyncio.create_task(collect("dropped"))
        assert await asyncio.to_thread(llm.wait_until, lambda a: a.stats["generated_tokens"] >= before + 12, 300)
        await llm.abort(["a", "b", "c"])
        s = llm.stats  # published before abort returned: a, b and c hold no blocks any more
        assert s["running"] == 1 and s["blocks_free"] < s["blocks_total"]  # "dropped" still runs
        dropped.cancel()  # its caller goes away: the stream's exit aborts it
        with pytest.raises(asyncio.CancelledError):
            await dropped
        return {rid: await t for rid, t in streams.items()}

    assert_pool_full(llm)
    results = asyncio.run(main())
    for outs in results.values():
        check_stream(outs)
        last = outs[-1].outputs[0]
        assert last.finish_reason == "abort" and 0 < len(last.token_ids) < 400
    assert_pool_full(llm)
    assert {rid for rid, _ in list(llm.aborted)[-4:]} == {"a", "b", "c", "dropped"}


def test_the_abort_record_is_bounded(llm):
    """A server aborts for as long as it runs: `aborted` keeps the latest ABORT_HISTORY aborts only, while
    num_aborted counts every one and aborts_since() reads the new ones."""
    assert_pool_full(llm)
    n = AsyncLLM.ABORT_HISTORY + 44
    before = llm.num_aborted
    llm.pause()  # they stay in the inbox: each abort takes one over and ends it before any step
    try:
        handles = [llm.submit(PROMPTS[i % 50], SamplingParams(max_tokens=4, **GREEDY), request_id=f"bounded-{i}")
                   for i in range(n)]

        async def abort_all():
            await llm.abort([h.request_id for h in handles])
        asyncio.run(abort_all())
    finally:
        llm.resume()
    assert all(h.result(60).outputs[0].finish_reason == "abort" for h in handles)
    assert llm.num_aborted == before + n
    assert len(llm.aborted) == AsyncLLM.ABORT_HISTORY
    assert llm.aborts_since(before) == [(f"bounded-{i}", 0) for i in range(n - AsyncLLM.ABORT_HISTORY, n)]
    assert llm.aborts_since(llm.num_aborted - 3) == [(f"bounded-{i}", 0) for i in range(n - 3, n)]
    assert_pool_full(llm)


def test_deadline_frees_every_block(llm):
    """n=2 sampled completions and a greedy one, every one stopped by its deadline, mid-generation."""
    assert_pool_full(llm)
    handles = [llm.submit("Write a long poem about the sea", SamplingParams(n=2, temperature=0.8, seed=1,
                                                                        max_tokens=2000, ignore_eos=True,
                                                                        deadline_s=0.5)),
               llm.submit("Count to a thousand:", SamplingParams(max_tokens=2000, deadline_s=0.7, **GREEDY))]
    for h in handles:
        out = h.result(timeout=300)
        assert out.finished and [c.finish_reason for c in out.outputs] == ["deadline"] * len(out.outputs)
        assert all(0 < len(c.token_ids) < 2000 for c in out.outputs)
    assert_pool_full(llm)


def test_deadline_is_met_within_one_step(llm):
    """The engine checks deadlines before every step: between a request's deadline and its end at most one
    step finishes (the one running when the deadline passed), so it ends at most one step late. Step times
    are measured here, on the engine thread."""
    assert_pool_full(llm)
    step_ends = []
    observe = lambda eng: step_ends.append(time.monotonic())
    llm.step_observers.append(observe)
    try:
        warm = llm.submit("Count to a thousand:", SamplingParams(max_tokens=16, **GREEDY)).result(300)
        step = warm.metrics.tpot  # one decode step of one sequence, measured
        for multiple in (10.3, 20.7):  # deadlines that fall inside a step, not at its end
            deadline_s = warm.metrics.ttft + multiple * step
            out = llm.submit("Count to a thousand:", SamplingParams(max_tokens=4000, deadline_s=deadline_s,
                                                                    **GREEDY)).result(300)
            m, c = out.metrics, out.outputs[0]
            due, ended = m.arrival_time + deadline_s, m.finished_time
            assert c.finish_reason == "deadline" and 0 < len(c.token_ids) < 4000
            steps_between = [t for t in step_ends if due < t < ended]
            ran = [b - a for a, b in zip(step_ends, step_ends[1:]) if m.arrival_time <= a and b <= ended]
            print(f"deadline {deadline_s * 1e3:.1f} ms: ended {(ended - due) * 1e3:.2f} ms late, "
                  f"{len(c.token_ids)} tokens, steps {min(ran) * 1e3:.2f}-{max(ran) * 1e3:.2f} ms")
            assert len(steps_between) <= 1
            assert ended - due <= max(ran)
    finally:
        llm.step_observers.remove(observe)
    assert_pool_full(llm)


# ---- plain threads --------------------------------------------------------------------------------------------
def test_handles_from_8_plain_threads(llm, alone):
    """8 threads with no event loop submit 4 requests each (the 32 first prompts) and collect them; one
    thread also follows its partial outputs, another cancels a long request."""
    assert_pool_full(llm)
    results, errors = {}, []

    def worker(w):
        try:
            mine = range(4 * w, 4 * w + 4)
            handles = {i: llm.submit(PROMPTS[i], SamplingParams(max_tokens=MAX_TOKENS[i], **GREEDY)) for i in mine}
            if w == 0:
                check_stream(list(handles[0]))
            if w == 1:
                long = llm.submit("Tell me a very long story", SamplingParams(max_tokens=4000, **GREEDY))
                first = next(iter(long))  # it is generating
                assert not first.finished and long.cancel() and long.cancelled() and long.done()
                with pytest.raises(CancelledError):
                    long.result()
            done, not_done = wait(handles.values(), timeout=300)
            assert not not_done
            results.update({i: h.result().outputs[0].token_ids for i, h in handles.items()})
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert [results[i] for i in range(32)] == alone[:32]
    assert_pool_full(llm)


def test_cancel_after_finish_is_false(llm, alone):
    h = llm.submit(PROMPTS[3], SamplingParams(max_tokens=MAX_TOKENS[3], **GREEDY), request_id="finished-one")
    assert h.result(300).outputs[0].token_ids == alone[3]
    assert not h.cancel() and not h.cancelled() and [o.outputs[0].token_ids for o in h] == [alone[3]]


def test_constructed_like_llm(reference_gguf_path, alone):
    """AsyncLLM(model, memory_budget=..., engine args) builds its own engine; shutdown fails what is left."""
    with AsyncLLM(str(reference_gguf_path), threads=1, memory_budget="256MB", max_num_seqs=4) as llm:
        out = llm.submit(PROMPTS[5], SamplingParams(max_tokens=MAX_TOKENS[5], **GREEDY)).result(300)
        assert out.outputs[0].token_ids == alone[5]
        llm.pause()
        dropped = llm.submit(PROMPTS[7], SamplingParams(max_tokens=4, **GREEDY))
        assert llm.num_waiting == 1 and dropped.cancel() and dropped.cancelled()  # cancelled in the inbox
        assert llm.num_waiting == 0 and llm.aborted[-1] == (dropped.request_id, 0)
        pending = llm.submit(PROMPTS[6], SamplingParams(max_tokens=4, **GREEDY))
    with pytest.raises(RuntimeError, match="shut down"):
        pending.result(60)
    with pytest.raises(RuntimeError, match="shut down"):
        llm.submit(PROMPTS[6])


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_failing_engine_fails_every_caller(reference_gguf_path):
    """An engine that breaks outside any one request's work (here the scheduler) ends the engine thread:
    every stream and handle gets the error (none waits forever), and new requests are refused at once.
    (A failing forward or sampler fails only its batch's requests: tests/test_hostile_requests.py.)"""
    engine = LLMEngine(str(reference_gguf_path), threads=1, max_model_len=256, max_num_seqs=4)

    def broken_schedule(*args):
        raise RuntimeError("boom")
    engine.scheduler.schedule = broken_schedule
    llm = AsyncLLM.from_engine(engine, start=False)
    handle = llm.submit(PROMPTS[0], SamplingParams(max_tokens=4, **GREEDY))

    async def stream():
        gen = llm.generate(PROMPTS[1], SamplingParams(max_tokens=4, **GREEDY))
        llm.start()
        async for _ in gen:
            pass

    with pytest.raises(RuntimeError, match="engine failed.*boom"):
        asyncio.run(stream())
    with pytest.raises(RuntimeError, match="engine failed.*boom"):
        handle.result(60)
    llm.shutdown()  # joins the (dying) engine thread
    assert isinstance(llm.error, RuntimeError) and not llm.alive
    with pytest.raises(RuntimeError, match="engine failed"):
        llm.submit(PROMPTS[2])
    assert not handle.cancel()  # already done: returns at once
