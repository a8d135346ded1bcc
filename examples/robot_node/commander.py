"""A scripted operator: sends observations and commands, step by step, like a control loop would.

Each step's messages go out together; the next step starts when the planner reports the outcome of
the step's last command (its `status`). Step 2 sends three commands back to back: the first two are
stale as soon as the next one arrives, and the planner must cancel them. Step 3 gives its command a
deadline (metadata deadline_s) far too short for any answer: the planner must send its fallback
action. When the script is done the commander exits, which ends the dataflow.
"""
import json

import pyarrow as pa
from dora import Node

SCRIPT = [
    [("observation", "front: clear for 2 m; gripper: empty; red cup 40 cm ahead", {}),
     ("command", "Drive forward 40 cm to the red cup.", {"command_id": "c1"})],
    [("command", "Turn right.", {"command_id": "c2"}),
     ("command", "No, turn left.", {"command_id": "c3"}),
     ("command", "Grip the red cup.", {"command_id": "c4"})],
    [("command", "Back up 20 cm.", {"command_id": "c5", "deadline_s": 0.001})],
    [("observation", "front: wall at 30 cm; gripper: holding the red cup", {}),
     ("command", "Release the cup.", {"command_id": "c6"})],
]


def send_step(node, step) -> str:
    for output_id, text, meta in step:
        node.send_output(output_id, pa.array([text]), meta)
    return [m["command_id"] for o, _, m in step if o == "command"][-1]


def main() -> None:
    node = Node()
    steps = iter(SCRIPT)
    waiting_for = None
    for event in node:
        if event["type"] != "INPUT":
            continue
        if event["id"] == "tick" and waiting_for is None:
            waiting_for = send_step(node, next(steps))
        elif event["id"] == "status":
            status = json.loads(event["value"][0].as_py())
            if status["command_id"] == waiting_for:
                step = next(steps, None)
                if step is None:
                    break  # done: leaving closes our outputs, the planner finishes and the flow ends
                waiting_for = send_step(node, step)


if __name__ == "__main__":
    main()
