"""The core: a gRPC server that resolves the allowlist, stores wheels and publishes manifests.

Layers, each importing only the ones below it (the import contract in pyproject.toml checks it):

    app      server assembly, lifecycle, the spk-core CLIs, certificates
    api      servicers (thin), the auth interceptor, domain error -> gRPC status
    install  the install pipeline: resolver, downloads, wheel checks, index client, rollback
    storage  blob stores (interface + backends), blob GC, storage migration
    fanout   the latest-value hub for satellite streams, Postgres NOTIFY between instances
    state    peewee models and the rows they hold: allowlist, lockfiles, settings, fleet, keys
"""
