"""Code both the core and the satellite use: wire stubs, manifest model, hashing, wheel safety."""
