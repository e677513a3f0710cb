"""Lab start-up and footprint: ``lab up`` time to all nodes Ready for 2 and 8 nodes, RSS per process.

Run as root from the repository root:  python -m bench.bench_lab [--nodes 2 8]
Each size gets a fresh lab under its own prefix and state directory, taken down
afterwards. Figures are printed, never asserted (machines are shared and noisy).
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

from ciliary.lab import processes
from ciliary.lab.lab import Lab
from ciliary.lab.layout import Binaries, LabLayout

ROOT = Path(__file__).resolve().parents[1]


def measure(nodes: int) -> tuple[float, dict[str, int]]:
    layout = LabLayout(state_dir=ROOT / f".lab-bench-{nodes}", prefix=f"cyb{nodes}")
    lab = Lab(layout, Binaries.discover())
    lab.down(log=False)
    try:
        t0 = time.monotonic()
        lab.up(nodes, log=False)
        elapsed = time.monotonic() - t0
        time.sleep(5)  # let the processes settle after start-up
        rss = {}
        for name in processes.names(layout):
            pid = processes.running_pid(layout, name)
            rss[name] = processes.rss_kib(pid) if pid else 0
        return elapsed, rss
    finally:
        lab.down(log=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, nargs="+", default=[2, 8])
    args = parser.parse_args()
    for nodes in args.nodes:
        elapsed, rss = measure(nodes)
        print(f"\n== lab up with {nodes} nodes: all nodes Ready in {elapsed:.1f} s")
        groups: dict[str, list[int]] = defaultdict(list)
        for name, kib in sorted(rss.items()):
            groups[name.rsplit("-node-", 1)[0]].append(kib)
        print(f"{'process':<26}{'count':>6}{'RSS each (MiB)':>18}{'total (MiB)':>14}")
        for group, values in sorted(groups.items()):
            each = f"{min(values) / 1024:.0f}" if min(values) == max(values) else \
                f"{min(values) / 1024:.0f}-{max(values) / 1024:.0f}"
            print(f"{group:<26}{len(values):>6}{each:>18}{sum(values) / 1024:>14.0f}")
        print(f"{'all':<26}{len(rss):>6}{'':>18}{sum(rss.values()) / 1024:>14.0f}")


if __name__ == "__main__":
    main()
