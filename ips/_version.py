"""The package version, in a module of its own so that every layer can read it without importing the
lazy public API of `ips`."""

__version__ = "0.1.0"
