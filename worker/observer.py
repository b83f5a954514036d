"""The servicer's hook for metrics: it reports what happened to an observer, which by default does
nothing. A metrics module implements these methods (and adds its gRPC interceptors to the server)."""

from __future__ import annotations

from registry.registry import ModelEntry


class WorkerObserver:
    """Called from the event loop after each event; implementations must be quick and never raise."""

    def model_loaded(self, entry: ModelEntry) -> None:
        """A model became READY (entry.load_seconds, entry.architecture, entry.model are set)."""

    def model_load_failed(self, model_id: str, architecture: str, seconds: float, code: str) -> None:
        """A Load failed (code: the status code name it returned)."""

    def model_unloaded(self, model_id: str, architecture: str, seconds: float, freed_bytes: int) -> None:
        """A model's memory was released; its per-model series should go away."""

    def lock_waited(self, model_id: str, seconds: float) -> None:
        """Time a call waited for the model's lock."""

    def forward_done(self, model_id: str, rpc: str, phase: str, seconds: float, tokens: int) -> None:
        """A Forward or ForwardPaged succeeded. seconds: time in the model (the reply's compute_seconds,
        without lock wait or encoding); phase: prefill | decode | mixed; tokens: input tokens."""

    def kv_transferred(self, model_id: str, direction: str, nbytes: int, seconds: float) -> None:
        """An ExportKvBlocks or ImportKvBlocks succeeded. direction: export | import; nbytes: K and V
        bytes moved; seconds: from the call's start to the last chunk sent or the blocks written."""

    def weights_updated(self, model_id: str, source: str, seconds: float) -> None:
        """A weight update was applied. source: disk | stream | distributed:<backend>; seconds:
        from the call's start (reading or receiving the tensors included) to the last copy."""

    def memory_resident(self, model_id: str, weight_bytes: int, kv_cache_bytes: int) -> None:
        """ReleaseMemory or ResumeMemory changed what the model holds: the bytes resident now."""


NULL_OBSERVER = WorkerObserver()
