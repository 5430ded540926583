"""Benchmark harness of the call-conversion pipeline; see bench/README.md. Not part of `make test`."""
