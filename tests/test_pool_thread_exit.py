"""A forward may return while a thread-pool worker still computes a copy of one of its matmul tasks
(native/src/threadpool.h run_dup: the caller re-ran it instead of waiting for a descheduled worker).
That late worker reads the calling thread's prepared activations, so a thread that calls forward and
exits at once (a server's short-lived worker thread) must not free them under it. Here every worker
task sleeps (TINYVLLM_POOL_TEST_TASK_DELAY_US: a worker the OS descheduled), each forward runs on a
fresh thread that exits right after, and the logits must be exactly those of a one-thread runner
(results never depend on which thread ran a task). Under the ASan build of the library a read after
the free is reported (.ci/run's sanitizer step runs the native equivalent,
threadpool_caller_thread_exits_while_a_worker_is_stale)."""
import json
import subprocess
import sys

import tiny_models as tm

CHILD = r"""
import json, sys, threading
import numpy as np
from tinyvllm.model import load_model
from tinyvllm.runner import NativeModelRunner
path, threads = sys.argv[1], int(sys.argv[2])
runner = NativeModelRunner(load_model(path), num_blocks=16, threads=threads)
table = np.arange(16, dtype=np.int32)[None]
toks, out = [5, 17, 42, 7, 99, 3], []
for step in range(12):
    res = []
    def fwd():
        n = len(toks) if step == 0 else 1  # a prefill, then decode steps
        ids = toks[-n:]
        pos = np.arange(len(toks) - n, len(toks))
        res.append(runner.forward(ids, pos, np.zeros(n), table, [n - 1])[0])
    t = threading.Thread(target=fwd)
    t.start()
    t.join()  # the thread has exited: its thread_locals are gone
    row = res[0]
    out.append(row.tolist())
    toks.append(int(np.argmax(row)))
print("RESULT " + json.dumps(out))
"""


def _logits(path: str, threads: int, env_extra: dict) -> list:
    import os
    env = {**os.environ, **env_extra}
    r = subprocess.run([sys.executable, "-c", CHILD, path, str(threads)], capture_output=True, text=True,
                       timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    line = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[7:])


def test_forward_on_threads_that_exit_at_once(tmp_path):
    # a 16,384-token vocabulary: the logits matmul (the forward's last) is split into many tasks
    path = str(tm.make_tiny_gguf(tmp_path / "m.gguf", qtype="Q4_0", vocab_size=16384))
    want = _logits(path, 1, {})
    got = _logits(path, 2, {"TINYVLLM_POOL_TEST_TASK_DELAY_US": "3000", "TINYVLLM_POOL_WAIT_SHARE": "0"})
    assert got == want
