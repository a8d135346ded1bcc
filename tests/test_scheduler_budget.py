"""The prefill token budget beside running decodes (decode priority): a long prompt arriving while
sequences decode is prefilled in chunks small enough that no decode waits long for its token, and
gets the whole max_num_batched_tokens when nothing decodes. Scheduler-level (no model) and through
the engine (greedy outputs unchanged against the old policy)."""
import pytest

from tinyvllm import LLM, SamplingParams
from tinyvllm.engine.block_manager import BlockManager
from tinyvllm.engine.scheduler import STEP_FIXED_TOKENS, Scheduler
from tinyvllm.engine.sequence import Sequence
from tinyvllm.sampler import SampleResult

BUDGET = 512


class NoText:
    """The detokenizer a sequence needs, for token ids that are never shown."""
    def add(self, token: int) -> str:
        return ""


def scheduler(**kw) -> Scheduler:
    return Scheduler(BlockManager(512, 16), max_num_seqs=32, max_num_batched_tokens=BUDGET, max_model_len=4096, **kw)


def add(sched: Scheduler, seq_id: int, prompt_len: int) -> Sequence:
    seq = Sequence(seq_id, str(seq_id), 0, [300 + (7 * seq_id + j) % 1000 for j in range(prompt_len)],
                   SamplingParams(max_tokens=1000, temperature=0, ignore_eos=True), NoText(), 0.0)
    sched.add([seq])
    return seq


def step(sched: Scheduler) -> dict[int, int]:
    """One step with a fake model (every sampled token is 400): {seq_id: tokens it ran}."""
    batch = sched.schedule()
    sched.postprocess(batch, [SampleResult(400, 0.0, None) for _ in batch.sampled])
    return {s.seq_id: n for s, n in zip(batch.seqs, batch.num_tokens)}


def decoding(sched: Scheduler, n: int) -> list[Sequence]:
    seqs = [add(sched, i, 40) for i in range(n)]
    while any(s.num_uncomputed_tokens > 1 for s in seqs) or sched.waiting:
        step(sched)
    return seqs


def test_full_budget_when_nothing_decodes():
    sched = scheduler()
    long = add(sched, 100, 1536)
    assert step(sched) == {100: BUDGET}
    assert step(sched) == {100: BUDGET}
    assert long.num_computed_tokens == 2 * BUDGET


@pytest.mark.parametrize("num_decodes", [1, 8, 24])
def test_prefill_chunk_limited_while_decodes_run(num_decodes):
    sched = scheduler()
    decodes = decoding(sched, num_decodes)
    long = add(sched, 100, 1536)
    limit = sched.prefill_budget(num_decodes)
    assert limit == int((3.0 - 1) * (STEP_FIXED_TOKENS + num_decodes)) < BUDGET - num_decodes
    steps = 0
    while long.num_uncomputed_tokens > 1:
        ran = step(sched)
        steps += 1
        assert all(ran[s.seq_id] == 1 for s in decodes)  # every decode runs in every step
        assert 0 < ran[long.seq_id] <= limit  # the prompt never takes more than the prefill budget
        assert sum(ran.values()) <= BUDGET
    assert steps == -(-1536 // limit)
    # the prompt now decodes too; when all decodes finish, a new prompt gets the whole budget again
    for s in decodes + [long]:
        sched.finish(s)
    nxt = add(sched, 101, 1000)
    assert step(sched) == {101: BUDGET}


def test_decodes_keep_their_tokens_behind_an_earlier_prefill():
    """A prompt ahead of the decodes in `running` (admitted earlier) must not eat their budget."""
    sched = scheduler()
    decodes = decoding(sched, 4)
    long = add(sched, 100, 3500)
    step(sched)
    sched.running.insert(0, sched.running.pop(sched.running.index(long)))  # as if admitted first
    ran = step(sched)
    assert list(ran)[0] == long.seq_id and all(ran[s.seq_id] == 1 for s in decodes)
    assert ran[long.seq_id] == sched.prefill_budget(4)


def test_old_policy_and_vllm_threshold():
    sched = scheduler(decode_stall_ratio=0)  # the old policy: the prompt takes all the budget the decodes left
    decodes = decoding(sched, 4)
    long = add(sched, 100, 1536)
    ran = step(sched)
    assert ran[long.seq_id] == BUDGET - 4 and all(ran[s.seq_id] == 1 for s in decodes)
    sched = scheduler(decode_stall_ratio=0, long_prefill_token_threshold=100)  # vLLM's fixed cap, always
    long = add(sched, 100, 1536)
    assert step(sched) == {100: 100}


def test_admission_waits_while_the_prefill_budget_is_spent():
    sched = scheduler()
    decodes = decoding(sched, 8)
    a, b = add(sched, 100, 1536), add(sched, 101, 50)
    ran = step(sched)
    assert ran[a.seq_id] == sched.prefill_budget(8) and b.seq_id not in ran  # b waits its turn (FCFS)
    assert sum(ran.values()) == 8 + sched.prefill_budget(8)


@pytest.fixture(scope="module")
def prompts():
    return [[300 + (11 * i + 3 * j) % 2000 for j in range(n)] for i, n in enumerate([700, 30, 45, 12, 300])]


def run(path, prompts, **kw):
    llm = LLM(str(path), threads=2, max_num_batched_tokens=256, max_model_len=1024, **kw)
    eng, params = llm.engine, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    # the short prompts decode first; the long ones arrive while they do
    for i in (1, 2, 3):
        eng.add_request(str(i), {"prompt_token_ids": prompts[i]}, params)
    eng.step()
    eng.step()
    for i in (0, 4):
        eng.add_request(str(i), {"prompt_token_ids": prompts[i]}, params)
    out, chunks = {}, []
    schedule = eng.scheduler.schedule

    def recording():
        batch = schedule()
        if batch and min(batch.num_tokens) == 1:  # the biggest chunk that ran beside decodes
            chunks.append(max(batch.num_tokens))
        return batch
    eng.scheduler.schedule = recording
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                out[o.request_id] = o.outputs[0].token_ids
    return out, max(chunks)


def test_greedy_outputs_unchanged_against_the_old_policy(reference_gguf_path, prompts):
    old, old_chunk = run(reference_gguf_path, prompts, decode_stall_ratio=0)
    new, new_chunk = run(reference_gguf_path, prompts)  # the default: decode priority
    assert len(old) == 5 and all(len(t) == 12 for t in old.values())
    assert new_chunk < 100 < old_chunk  # the policies did schedule differently
    assert new == old
