"""Opens idle RefreshScriptPackages streams, one channel (one connection) per satellite.

    python -m scripts.benchlib.subs_worker CORE TOKENS_JSON

Prints "open" once every stream got its first message, then holds them until stdin closes.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import grpc

from shared.proto.scriptpkgs.v1 import distribution_pb2 as pb
from shared.proto.scriptpkgs.v1 import distribution_pb2_grpc


async def _main(core: str, tokens: list[str]) -> None:
    # A local subchannel pool gives each channel its own connection, as separate hosts would.
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(core, options=options) for _ in tokens]
    calls = []
    for channel, token in zip(channels, tokens, strict=True):
        stub = distribution_pb2_grpc.PackageDistributionStub(channel)
        calls.append(
            stub.RefreshScriptPackages(
                pb.SubscribeRequest(agent_version="bench"),
                metadata=(("authorization", f"Bearer {token}"),),
            )
        )
    await asyncio.gather(*(call.read() for call in calls))
    print("open", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for call in calls:
        call.cancel()
    await asyncio.gather(*(channel.close() for channel in channels))


if __name__ == "__main__":
    asyncio.run(_main(sys.argv[1], json.loads(Path(sys.argv[2]).read_text())))
