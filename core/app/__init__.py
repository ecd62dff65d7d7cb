"""Assembly and entry points: the server's lifecycle, the spk-core CLIs, certificates."""
