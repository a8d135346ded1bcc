"""Prints what the planner sends and, when ROBOT_LOG names a file, writes one JSON line per message
(input id, text, metadata) for later checking."""
import json
import os

from dora import Node


def main() -> None:
    node = Node()
    log = open(os.environ["ROBOT_LOG"], "w", encoding="utf-8") if os.environ.get("ROBOT_LOG") else None
    for event in node:
        if event["type"] != "INPUT":
            continue
        text, meta = event["value"][0].as_py(), dict(event.get("metadata") or {})
        if event["id"] != "partial":
            print(f"{event['id']:>7} {meta.get('command_id', '')}: {text}", flush=True)
        if log:
            log.write(json.dumps({"id": event["id"], "text": text, "metadata": meta}, default=str) + "\n")
            log.flush()
    if log:
        log.close()


if __name__ == "__main__":
    main()
