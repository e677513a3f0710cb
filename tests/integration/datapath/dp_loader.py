"""A loader process for the restart test: apply an intent, say READY, then wait to be killed.

``python dp_loader.py <node> <netns> <intent.json> <veths.json>``
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ciliary.nodeagent import planning
from ciliary.nodeagent.datapath import compiling, engine
from ciliary.operator import intents


def main() -> None:
    node, netns, intent_path, veths_path = sys.argv[1:5]
    intent = intents.parse_node_intent("n", Path(intent_path).read_bytes())
    veths = {ip: planning.HostVeth(v[0], v[1]) for ip, v in json.loads(Path(veths_path).read_text()).items()}
    dp = engine.Datapath(node, netns=netns)
    dp.start()
    dp.apply(intent, veths)
    print(f"READY {compiling.compile_count()}", flush=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        time.sleep(0.5)


if __name__ == "__main__":
    main()
