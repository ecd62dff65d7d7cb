"""The satellite agent: sync to the core's desired lockfile, materialise offline, run scripts."""
