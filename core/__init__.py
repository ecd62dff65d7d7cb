"""The core: admin API, install pipeline, blob stores and distribution to satellites."""
