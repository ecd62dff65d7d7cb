"""The install pipeline: allowlist -> resolution -> checked wheels -> a signed, published set."""
