"""Hosts many Agent objects in one process for the fan-out figure.

    python -m scripts.benchlib.fanout_worker CORE KEY_FILE BASE_HASH SPEC_JSON

SPEC_JSON lists {"name", "token", "data_dir"}. Prints "converged" once every agent is on
BASE_HASH; then, for each target hash read from stdin (one per line, until EOF), one JSON line:
name -> the wall-clock time its reconcile to that target was seen finished (null if not within
the limit). Results are watched all along, so an agent faster than the stdin line still counts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from pathlib import Path

from satellite.agent import Agent, AgentConfig

POLL = 0.005
LIMIT = 120.0


async def _main(core: str, pem: str, base: str, specs: list[dict[str, str]]) -> None:
    agents = {
        s["name"]: Agent.from_config(
            AgentConfig(
                core=core,
                token=s["token"],
                data_dir=Path(s["data_dir"]),
                signing_key_pem=pem,
                watch_drift=False,  # a per-host feature; 50 observers in one process help nobody
                backoff_base=0.2,
            )
        )
        for s in specs
    }
    for agent in agents.values():
        agent.start()
    try:
        await asyncio.gather(*(a.wait_synced(base, LIMIT) for a in agents.values()))
        print("converged", flush=True)
        seen: dict[tuple[str, str], float] = {}  # (agent, hash) -> when its READY was seen
        loop = asyncio.get_running_loop()
        line = loop.run_in_executor(None, sys.stdin.readline)
        target: str | None = None
        deadline = 0.0
        while True:
            now = time.time()
            for name, agent in agents.items():
                result = agent.last_result
                if result is not None and result.ok:
                    seen.setdefault((name, result.lockfile_hash), now)
            if target is None and line.done():
                target = (await line).strip()
                if not target:
                    return  # stdin closed: done
                deadline = time.monotonic() + LIMIT
            if target is not None:
                ready = all((name, target) in seen for name in agents)
                if ready or time.monotonic() > deadline:
                    times = {name: seen.get((name, target)) for name in agents}
                    print(json.dumps(times), flush=True)
                    target = None
                    line = loop.run_in_executor(None, sys.stdin.readline)
            await asyncio.sleep(POLL)
    finally:
        await asyncio.gather(*(a.shutdown() for a in agents.values()))


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    core, key_file, base, spec_file = sys.argv[1:5]
    pem = Path(key_file).read_text()
    specs = json.loads(Path(spec_file).read_text())
    asyncio.run(_main(core, pem, base, specs))
