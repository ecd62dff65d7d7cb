"""The gRPC surface: thin servicers, the auth interceptor and the one error -> status mapping."""
