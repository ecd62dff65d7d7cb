"""The satellite agent: sync to the core's desired lockfile, materialise offline, run scripts.

agent.py    Agent: the lifecycle (refresh stream -> worker), assembled from injected parts
retry.py    SyncRetry: a failed sync is asked for again after a jittered backoff
client.py   GrpcCoreClient: the gRPC adapter; status codes become shared.errors here
drift.py    DriftWatcher: watchdog on the data dir asks the worker for drift repair
runner.py   `spk-satellite run`: a script against exactly the current tree
cli.py      `spk-satellite`: agent, run, status
sync/       the pure sync logic (reconciler, materialiser, worker) over async Protocols
store/      the data dir on disk, and AsyncStore, the one adapter that uses threads
"""
