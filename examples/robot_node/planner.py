"""The tinyvllm node: text commands (+ the latest observation) in, one JSON action per command out.

Inputs  command      a text command; metadata: command_id (str), deadline_s (float, optional)
        observation  a text observation of the world; the newest one goes into the next prompt
Outputs partial      the action's text so far, while it is generated (metadata: command_id)
        action       the final action, JSON text valid against schema.json (metadata: command_id,
                     source "model" or "fallback", finish_reason)
        status       one JSON line per command when it ends: outcome "done", "deadline", "invalid"
                     (both answered with the fallback action) or "cancelled" (superseded by a newer
                     command: its request is aborted and its KV blocks freed; no action is sent)

The model is constrained to schema.json by structured outputs (llguidance), so a finished answer is
valid JSON of that schema. A request that runs out of time (deadline_s) or tokens ends early with
partial JSON: the node then sends the fallback action {"action": "stop", ...}, which is what a robot
should do when its planner cannot answer in time.

Settings come from the environment (the dataflow's `env:` or the shell): ROBOT_MODEL (alias or .gguf
path, default smollm2-135m), ROBOT_MEMORY_BUDGET (e.g. 256MB), ROBOT_THREADS, ROBOT_MAX_TOKENS,
ROBOT_DEADLINE_S (the default per-command deadline).
"""
from __future__ import annotations

import json
import os
import queue
import threading
from pathlib import Path

import pyarrow as pa

from tinyvllm import AsyncLLM, SamplingParams
from tinyvllm.model.fetch import DEFAULT_MODEL
from tinyvllm.sampling_params import StructuredOutputsParams

SCHEMA = json.loads((Path(__file__).resolve().parent / "schema.json").read_text())
FALLBACK = {"action": "stop", "direction": "none", "distance_cm": 0}
SYSTEM = ("You control a small wheeled robot with a gripper. Turn the operator's command into one action "
          "as JSON with the fields action (move, turn, grip, release or stop), direction (forward, "
          "backward, left, right or none) and distance_cm (an integer; 0 when it does not apply).")


class Planner:
    """Everything but the dora event loop: commands in, messages to send out (a list of
    (output id, text, metadata)). One request runs at a time; a newer command cancels it."""

    def __init__(self, llm: AsyncLLM, *, max_tokens: int = 48, deadline_s: float | None = None):
        self.llm, self.max_tokens, self.deadline_s = llm, max_tokens, deadline_s
        self.observation = "nothing observed yet"
        self.current: tuple[str, object] | None = None  # (command_id, RequestHandle)
        self.events: queue.Queue = queue.Queue()          # (command_id, RequestOutput, final) from readers

    def observe(self, text: str) -> None:
        self.observation = text

    def command(self, command_id: str, text: str, deadline_s: float | None = None) -> list[tuple]:
        sent = self._supersede(command_id)
        messages = [{"role": "system", "content": SYSTEM},
                    {"role": "user", "content": f"Observation: {self.observation}\nCommand: {text}"}]
        prompt = self.llm.tokenizer.apply_chat_template(messages)
        params = SamplingParams(temperature=0.0, max_tokens=self.max_tokens,
                                deadline_s=deadline_s if deadline_s is not None else self.deadline_s,
                                structured_outputs=StructuredOutputsParams(json=SCHEMA))
        handle = self.llm.submit({"prompt": prompt, "prompt_token_ids":
                                  self.llm.tokenizer.encode(prompt, add_special_tokens=False)}, params)
        self.current = (command_id, handle)
        threading.Thread(target=self._read, args=(command_id, handle), daemon=True).start()
        return sent

    def _supersede(self, newer: str) -> list[tuple]:
        if self.current is None:
            return []
        command_id, handle = self.current
        self.current = None
        # cancel() returns once the request is aborted and its blocks are free; False: it had finished
        # already, and its final output is waiting in self.events (sent by poll() as usual)
        if handle.cancel():
            return [("status", json.dumps({"command_id": command_id, "outcome": "cancelled",
                                           "superseded_by": newer}), {"command_id": command_id})]
        return self._final_of(command_id)

    def _read(self, command_id: str, handle) -> None:  # a reader thread per request
        for out in handle:  # ends early (without a finished output) when the request is cancelled
            self.events.put((command_id, out, out.finished))

    def _final_of(self, command_id: str) -> list[tuple]:
        """Drain the reader's events of a request that finished before it could be cancelled."""
        sent = []
        while True:
            try:
                cid, out, final = self.events.get(timeout=5)
            except queue.Empty:
                return sent
            if cid == command_id and final:
                return sent + self._finish(cid, out)

    def poll(self) -> list[tuple]:
        """What the reader threads produced since the last call, as messages to send."""
        sent = []
        while True:
            try:
                cid, out, final = self.events.get_nowait()
            except queue.Empty:
                return sent
            if self.current is None or cid != self.current[0]:
                continue  # a superseded request's late output
            if final:
                self.current = None
                sent += self._finish(cid, out)
            else:
                sent.append(("partial", out.outputs[0].text, {"command_id": cid}))

    @property
    def busy(self) -> bool:
        return self.current is not None

    def _finish(self, command_id: str, out) -> list[tuple]:
        completion = out.outputs[0]
        action, source, outcome = None, "model", "done"
        if completion.finish_reason == "stop":
            try:
                action = json.loads(completion.text)
            except json.JSONDecodeError:
                action = None
        if completion.finish_reason == "deadline":
            outcome = "deadline"
        elif action is None:
            outcome = "invalid"
        if action is None:
            action, source = FALLBACK, "fallback"
        meta = {"command_id": command_id, "source": source, "finish_reason": completion.finish_reason}
        status = {"command_id": command_id, "outcome": outcome, "text": completion.text,
                  "tokens": len(completion.token_ids), "finish_reason": completion.finish_reason}
        if out.metrics is not None and out.metrics.ttft is not None:
            status["ttft_s"] = round(out.metrics.ttft, 4)
        return [("action", json.dumps(action), meta), ("status", json.dumps(status), {"command_id": command_id})]


def make_llm() -> AsyncLLM:
    env = os.environ
    threads = int(env["ROBOT_THREADS"]) if env.get("ROBOT_THREADS") else None
    return AsyncLLM(env.get("ROBOT_MODEL") or DEFAULT_MODEL, threads=threads,
                    memory_budget=env.get("ROBOT_MEMORY_BUDGET") or None,
                    enable_structured_outputs=True)  # its actions are schema-constrained: a budget reserves for them


def main() -> None:
    from dora import Node

    env = os.environ
    deadline = float(env["ROBOT_DEADLINE_S"]) if env.get("ROBOT_DEADLINE_S") else None
    node = Node()
    with make_llm() as llm:
        planner = Planner(llm, max_tokens=int(env.get("ROBOT_MAX_TOKENS", "48")), deadline_s=deadline)
        inputs_open = True
        while inputs_open or planner.busy:
            event = node.next(timeout=0.02) if inputs_open else None
            sent = []
            if event is not None:
                kind = event["type"]
                if kind == "INPUT":
                    text = event["value"][0].as_py()
                    meta = event.get("metadata") or {}
                    if event["id"] == "observation":
                        planner.observe(text)
                    elif event["id"] == "command":
                        d = meta.get("deadline_s")
                        sent += planner.command(str(meta.get("command_id", text)), text,
                                                float(d) if d is not None else None)
                elif kind in ("STOP", "ALL_INPUTS_CLOSED"):
                    inputs_open = False
            elif not inputs_open:
                threading.Event().wait(0.02)
            sent += planner.poll()
            for output_id, text, meta in sent:
                node.send_output(output_id, pa.array([text]), meta)


if __name__ == "__main__":
    main()
