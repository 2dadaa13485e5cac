"""Benchmarks behind `ips bench`: memory flat in the number of patches, selection throughput against the
encoder's own, and the complexity of the encoders we ship. One module per measurement; each writes its
part of the `--json` contract (docs/ARCHITECTURE.md) and prints a table.
"""
