"""The gRPC worker: server, servicer, settings, metrics, logging and CLI."""

__version__ = "0.1.0"
