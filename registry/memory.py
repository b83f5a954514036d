"""Release and resume a loaded model's memory (sleep / wake, as RL trainers drive it).

Released tensors keep their Python objects, so every module and cache list that refers to them
stays wired up. A parameter's `.data` is swapped for an empty tensor and back (tied weights are one
Parameter object, so they stay tied); a KV cache tensor's storage shrinks to zero bytes and grows
back (`untyped_storage().resize_`, as FSDP frees parameters), which keeps the per-layer views of
the paged cache valid. Weights are either copied to host memory first (offload) and copied back, or
dropped and read again from the checkpoint they came from. KV caches are dropped and come back
zeroed: what they held is lost, as in vLLM's sleep mode, and a scheduler prefills again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import FailedPrecondition, InvalidArgument

WEIGHTS = "weights"
KV_CACHE = "kv_cache"
TAGS = (WEIGHTS, KV_CACHE)


def parse_tags(tags: Iterable[str]) -> tuple[str, ...]:
    """Known tags in canonical order; none means both."""
    given = [t.strip().lower() for t in tags]
    unknown = sorted({t for t in given if t not in TAGS})
    if unknown:
        raise InvalidArgument(f"unknown memory tag(s) {unknown}; valid tags are {list(TAGS)}")
    return tuple(t for t in TAGS if t in given) if given else TAGS


@dataclass
class _Storage:
    tensor: torch.Tensor  # a weight (its .data is swapped) or a cache tensor (storage resized)
    nbytes: int
    host: torch.Tensor | None = None  # a weight's values on the host when offloaded
    swap_data: bool = False  # a weight (parameter or quantized layer's buffer): .data is swapped


@dataclass
class ReleasedMemory:
    """What ReleaseMemory freed, per tag, until ResumeMemory brings it back."""

    storages: dict[str, list[_Storage]] = field(default_factory=dict)
    offloaded: bool = False  # weights kept in host memory (else re-read on resume)
    shapes: dict[int, torch.Size] = field(default_factory=dict)  # id(parameter) → its shape

    @property
    def tags(self) -> tuple[str, ...]:
        return tuple(t for t in TAGS if t in self.storages)

    def bytes_of(self, tag: str) -> int:
        return sum(s.nbytes for s in self.storages.get(tag, ()))


def weight_tensors(model: object) -> list[torch.Tensor]:
    """Parameters, plus the buffers of quantized layers (their codes and scales are the weights)."""
    network = getattr(model, "network", None)
    if not isinstance(network, nn.Module):
        raise FailedPrecondition(f"{type(model).__name__} has no network whose memory can be released")
    tensors: list[torch.Tensor] = list(network.parameters())  # each once: tied weights share one object
    for module in network.modules():
        # architectures.quantized_linear.QuantizedLinear (duck-typed: registry does not import architectures)
        if getattr(module, "kernel", None) is not None and hasattr(module, "dequantize"):
            tensors.extend(b for b in module.buffers(recurse=False) if b is not None)
    return tensors


def kv_cache_tensors(model: object) -> list[torch.Tensor]:
    tensors = getattr(model, "kv_cache_tensors", None)
    if tensors is None:
        raise FailedPrecondition(f"{type(model).__name__} cannot release its KV cache")
    return list(tensors())


def _storages(tensors: Iterable[torch.Tensor]) -> list[_Storage]:
    """One entry per distinct non-empty storage (cache views share one)."""
    seen: set[int] = set()
    out: list[_Storage] = []
    for t in tensors:
        storage = t.untyped_storage()
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0 or ptr in seen:
            continue
        seen.add(ptr)
        out.append(_Storage(t, nbytes))
    return out


def _own_resizable_storage(tensors: list[torch.Tensor]) -> None:
    """Move tensors whose storage cannot be resized (a lazily zeroed anonymous map) onto a fresh
    storage of the same size, views of one storage staying views of one. The fresh pages are not
    touched before they are dropped, so this costs no resident memory."""
    fresh: dict[int, torch.UntypedStorage] = {}
    for t in tensors:
        old = t.untyped_storage()
        if old.nbytes() == 0 or old.resizable():
            continue
        new = fresh.get(old.data_ptr())
        if new is None:
            new = fresh[old.data_ptr()] = torch.UntypedStorage(old.nbytes(), device=old.device)
        t.set_(new, t.storage_offset(), t.shape, t.stride())


def _drop(s: _Storage) -> None:
    if s.swap_data:
        s.tensor.data = torch.empty(0, dtype=s.tensor.dtype, device=s.tensor.device)
    else:
        s.tensor.untyped_storage().resize_(0)


def _regrow(s: _Storage, shape: torch.Size) -> None:
    if s.swap_data:
        s.tensor.data = torch.empty(shape, dtype=s.tensor.dtype, device=s.tensor.device)
    else:
        s.tensor.untyped_storage().resize_(s.nbytes)


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    """The whole storage behind t as uint8 [nbytes] (a view, no copy)."""
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())


def release(
    model: object, released: ReleasedMemory | None, tags: Iterable[str], offload: bool
) -> tuple[ReleasedMemory, int]:
    """Free `tags` (those not already free); returns the record and the bytes freed. The caller
    holds the model exclusively."""
    record = released or ReleasedMemory()
    freed = 0
    # Replacement tensors are made in the caller's mode (the worker's model threads run in
    # inference mode, as the Load that made the parameters did).
    with torch.no_grad():
        for tag in tags:
            if tag in record.storages:
                continue
            if tag == WEIGHTS:
                storages = [
                    _Storage(p, p.numel() * p.element_size(), swap_data=True) for p in weight_tensors(model)
                ]
                record.shapes = {id(s.tensor): s.tensor.shape for s in storages}
            else:
                kv = kv_cache_tensors(model)
                _own_resizable_storage(kv)
                storages = _storages(kv)
            if tag == WEIGHTS and offload:
                pin = any(s.tensor.device.type == "cuda" for s in storages)
                for s in storages:
                    s.host = torch.empty(s.tensor.shape, dtype=s.tensor.dtype, pin_memory=pin)
                    s.host.copy_(s.tensor)
                record.offloaded = True
            for s in storages:
                _drop(s)
                freed += s.nbytes
            record.storages[tag] = storages
    return record, freed


def resume(
    model: object,
    record: ReleasedMemory,
    tags: Iterable[str],
    reread: Callable[[], None],
) -> tuple[ReleasedMemory | None, int]:
    """Bring `tags` back (those released): weights from the host copy or through `reread()` (which
    reads the checkpoint into the model's parameters), KV caches zeroed. Returns the record (None
    when nothing stays released) and the bytes restored. On failure the tag stays released."""
    restored = 0
    with torch.no_grad():
        for tag in tags:
            storages = record.storages.get(tag)
            if storages is None:
                continue
            try:
                for s in storages:
                    _regrow(s, record.shapes.get(id(s.tensor), torch.Size()))
                if tag == KV_CACHE:
                    for s in storages:
                        _bytes_of(s.tensor).zero_()
                elif all(s.host is not None for s in storages):
                    for s in storages:
                        s.tensor.copy_(s.host)
                else:
                    reread()
            except BaseException:
                for s in storages:  # back to released: no half-restored tensor is ever used
                    _drop(s)
                raise
            del record.storages[tag]
            if tag == WEIGHTS:
                record.offloaded = False
            if tag == KV_CACHE:
                reset = getattr(model, "reset_kv_cache", None)
                if reset is not None:
                    reset()  # zeroed, and the contiguous cache's rows counted empty again
            restored += sum(s.nbytes for s in storages)
            # Resumed tensors live at new addresses: a model that captured them (CUDA graphs)
            # captures again here.
            hook = getattr(model, "memory_resumed", None)
            if hook is not None:
                hook(tag)
    return (record if record.storages else None), restored
