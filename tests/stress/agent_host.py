"""Many satellite agents in one process, for fleet-scale fault tests.

    python -m tests.stress.agent_host SPEC_JSON STATUS_JSON

SPEC_JSON: {"core": "host:port", "key_pem": "...", "agents": [{"name", "token", "data_dir"}],
"backoff_base": s, "backoff_cap": s, "proxy": optional "host:port"}. Each agent is a real
satellite.agent.Agent (no module-level state, drift watching off). Every 0.25 s STATUS_JSON is
replaced with each agent's state: connected, reconnect count, current hash, and the wall-clock
times at which it (re)connected. Stops on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

from satellite.agent import Agent, AgentConfig
from satellite.store import SatelliteStore


async def _run(spec: dict[str, object], status: Path) -> None:
    agents = [
        Agent.from_config(
            AgentConfig(
                core=str(spec.get("proxy") or spec["core"]),
                token=a["token"],
                data_dir=Path(a["data_dir"]),
                signing_key_pem=str(spec["key_pem"]),
                watch_drift=False,
                backoff_base=float(spec.get("backoff_base", 0.5)),  # type: ignore[arg-type]
                backoff_cap=float(spec.get("backoff_cap", 30.0)),  # type: ignore[arg-type]
            )
        )
        for a in spec["agents"]  # type: ignore[attr-defined]
    ]
    names = [a["name"] for a in spec["agents"]]  # type: ignore[attr-defined]
    # The agents' own stores are async; the status file reads `current` straight off the disk.
    disks = [SatelliteStore(Path(a["data_dir"])) for a in spec["agents"]]  # type: ignore[attr-defined]
    connects: list[list[float]] = [[] for _ in agents]
    was = [False] * len(agents)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    for agent in agents:
        agent.start()
    last_write = 0.0
    while not stop.is_set():
        now = time.time()
        for i, agent in enumerate(agents):
            up = agent.connected.is_set()
            if up and not was[i]:
                connects[i].append(now)
            was[i] = up
        if now - last_write >= 0.25:
            _write(status, names, agents, disks, connects)
            last_write = now
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.01)
    _write(status, names, agents, disks, connects)
    await asyncio.gather(*(a.shutdown() for a in agents))


def _write(
    status: Path,
    names: list[str],
    agents: list[Agent],
    disks: list[SatelliteStore],
    connects: list[list[float]],
) -> None:
    doc = {
        "pid": os.getpid(),
        "agents": {
            name: {
                "connected": agent.connected.is_set(),
                "reconnects": agent.reconnects,
                "current": disk.current_hash(),
                "connects": times,
                "alive": agent.running,
            }
            for name, agent, disk, times in zip(names, agents, disks, connects, strict=True)
        },
    }
    tmp = status.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))
    tmp.replace(status)


def main(spec_path: str, status_path: str) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    spec = json.loads(Path(spec_path).read_text())
    asyncio.run(_run(spec, Path(status_path)))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    sys.exit(main(*sys.argv[1:3]))
