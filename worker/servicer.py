"""The ModelWorker servicer: decode the request, call the registry or the model, encode the reply.

Model work runs in a thread executor inside `torch.inference_mode`, so the event loop stays free for
ListModels, Info and health. A per-model asyncio.Lock serializes the calls that touch a model's
state; a cancelled call keeps the lock until its thread is done.
Errors are raised as `registry.errors` types and mapped to status codes in `status.py`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from typing import TypeVar

import grpc
import torch

from architectures.sampling import Sampler, SequenceSample, verification_rows
from registry import KvCacheOptions, LoadOptions, LoadPlan, Model, ModelRegistry
from registry.config_checks import check_checkpoint_shapes
from registry.cpu_gemm import calibrate_cpu_gemm
from registry.errors import InvalidArgument, ModelNotReady, OutOfResources
from registry.paged_checks import check_token_count, resolve_query_lens
from registry.registry import LoadOutcome, ModelEntry, ModelState, validate_model_id
from registry.safetensors_loader import index_checkpoint

from . import __version__, kv_transfer, sampling_codec
from . import devices as dev
from . import request_limits as limits
from .compute_threads import ComputeThreads, single_threaded_executor
from .logs import LOGGER_NAME, fields
from .observer import NULL_OBSERVER, WorkerObserver
from .pb.modelworker.v1 import worker_pb2 as pb
from .pb.modelworker.v1 import worker_pb2_grpc as pb_grpc
from .settings import CPU_GEMMS, LOAD_MODES, Settings
from .status import is_out_of_memory, map_exception, note, rpc_method
from .tensor_parallel import intra_op_threads
from .tensors import encode_tensor, fill_top_k, logits_dtype, logits_mode, logits_response_bytes, top_k
from .weights_service import WeightsServicerMixin, released_tags

T = TypeVar("T")
log = logging.getLogger(LOGGER_NAME)

LOAD_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
STATE_TO_PB = {ModelState.LOADING: pb.LOADING, ModelState.READY: pb.READY, ModelState.UNLOADING: pb.UNLOADING}
STATE_TO_PB[ModelState.SLEEPING] = pb.SLEEPING
# Threads for model work (one primary, the rest overflow): forwards on different models overlap, and
# a slow Load leaves room for them.
EXECUTOR_THREADS = 8


def dtype_name(dtype: torch.dtype | None) -> str:
    return str(dtype).removeprefix("torch.") if dtype is not None else ""


def _phase_dense(use_cache: bool, start_pos: int, seq_len: int) -> str:
    return "decode" if use_cache and start_pos > 0 and seq_len == 1 else "prefill"


def _phase_paged(is_prefill: bool, query_lens: list[int], context_lens: list[int]) -> str:
    if not is_prefill:
        return "decode"
    decoding = [q == 1 and c > 1 for q, c in zip(query_lens, context_lens, strict=False)]
    if all(decoding):
        return "decode"
    return "mixed" if any(decoding) else "prefill"


class ModelWorkerServicer(WeightsServicerMixin, pb_grpc.ModelWorkerServicer):
    def __init__(
        self,
        registry: ModelRegistry,
        settings: Settings,
        observer: WorkerObserver = NULL_OBSERVER,
        executor: Executor | None = None,
    ) -> None:
        self.registry = registry
        self.settings = settings
        self.observer = observer
        self.default_device = dev.resolve_default_device(settings.device)
        # The intra-op threads this process was started with (--threads), for model work on the
        # primary compute thread; every other thread runs torch with one (worker/compute_threads.py).
        self.compute_threads = intra_op_threads(settings)
        self._executor = executor or ComputeThreads(self.compute_threads, EXECUTOR_THREADS - 1)
        # Loads run apart: a Load stuck reading a file cannot take the threads forwards need.
        self._load_executor = single_threaded_executor(settings.load_threads, "load")
        # cpu_gemm auto's measurement, once per process (60-100 ms, registry/cpu_gemm.py), here: on
        # the thread forwards run on and with their thread count. A Load thread has one, and any
        # Load may ask for auto on the CPU (LoadRequest.cpu_gemm, device), whatever the defaults.
        self._executor.submit(calibrate_cpu_gemm).result()
        # One lock per model id while any call holds or waits for it; the entry goes when the last
        # user is done, so ids that come and go do not accumulate.
        self._locks: dict[str, asyncio.Lock] = {}
        self._lock_users: dict[str, int] = {}
        # Bytes admitted for loads still building, so concurrent loads cannot both take the same memory.
        self._reserved: dict[object, int] = {}
        self._reserve_lock = threading.Lock()
        self.sampler = Sampler()  # unseeded draws of every model

    def close(self, wait: bool = True) -> None:
        """Stop the executors; wait=False leaves threads still running (a stuck Load) behind."""
        self.destroy_weights_groups()
        self._executor.shutdown(wait=wait, cancel_futures=not wait)
        self._load_executor.shutdown(wait=wait, cancel_futures=not wait)

    # -- running model work ------------------------------------------------------------------
    async def _in_thread(self, fn: Callable[[], T], executor: Executor | None = None) -> T:
        """Run fn in the executor; a cancelled caller leaves the thread to finish."""
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(executor or self._executor, functools.partial(_inference, fn))
        future.add_done_callback(_consume)
        return await asyncio.shield(future)

    def _lock_for(self, model_id: str) -> asyncio.Lock:
        """The model's lock, counting the caller as a user until `_lock_done`."""
        lock = self._locks.get(model_id)
        if lock is None:
            lock = self._locks[model_id] = asyncio.Lock()
        self._lock_users[model_id] = self._lock_users.get(model_id, 0) + 1
        return lock

    def _lock_done(self, model_id: str) -> None:
        users = self._lock_users[model_id] - 1
        if users:
            self._lock_users[model_id] = users
        else:  # nobody holds or waits: a later call may start a fresh lock
            del self._lock_users[model_id]
            del self._locks[model_id]

    async def _locked(self, model_id: str, fn: Callable[[], T]) -> T:
        """fn under the model's asyncio lock, in the executor. The lock is released when the thread
        finishes, not when the caller gives up, so nothing can free the model under a running call.

        One hop each way: the thread hands its outcome to the loop with a single call_soon_threadsafe,
        whose callback releases the lock and resolves the future the caller awaits (no wrapped
        concurrent future, no shield: each of those costs another turn of the loop per call)."""
        lock = self._lock_for(model_id)
        waited = time.perf_counter()
        try:
            await lock.acquire()
        except BaseException:  # cancelled while waiting
            self._lock_done(model_id)
            raise
        self.observer.lock_waited(model_id, time.perf_counter() - waited)
        loop = asyncio.get_running_loop()
        outcome: asyncio.Future[T] = loop.create_future()

        def finished(result: object, error: BaseException | None) -> None:  # on the loop
            lock.release()
            self._lock_done(model_id)
            if outcome.cancelled():  # the caller gave up; nobody wants the result
                return
            if error is None:
                outcome.set_result(result)  # type: ignore[arg-type]
            else:
                outcome.set_exception(error)

        def body() -> None:  # in the thread
            try:
                result = _inference(fn)
            except BaseException as exc:
                loop.call_soon_threadsafe(finished, None, exc)
            else:
                loop.call_soon_threadsafe(finished, result, None)

        try:
            self._executor.submit(body)
        except BaseException:
            lock.release()
            self._lock_done(model_id)
            raise
        return await outcome

    async def _on_model(self, model_id: str, fn: Callable[[Model], T]) -> T:
        """fn(model) under the lock, with exclusive access to the READY model (NOT_FOUND first)."""
        self.registry.get_entry(model_id)
        return await self._locked(model_id, self._with_model(model_id, fn))

    def _with_model(self, model_id: str, fn: Callable[[Model], T]) -> Callable[[], T]:
        """A thread body: exclusive access to the READY model; OOM gives memory back and says so."""

        def body() -> T:
            with self.registry.get_model_mut(model_id) as model:
                try:
                    result = fn(model)
                    if isinstance(result, (pb.ForwardResponse, pb.ForwardPagedResponse)):
                        # The weights that computed it: read under the lock an update also takes.
                        result.weights_version = self.registry.get_entry(model_id).weights_version
                    return result
                except Exception as exc:
                    if not is_out_of_memory(exc):
                        raise
                    dev.release_cached_memory(model.device)
                    raise OutOfResources(
                        f"out of memory on {model.device} running model {model_id!r}: {exc}"
                    ) from None

        return body

    # -- Load / Unload -------------------------------------------------------------------------
    @rpc_method("Load")
    async def Load(self, request: pb.LoadRequest, context: grpc.aio.ServicerContext) -> pb.LoadResponse:
        validate_model_id(request.model_id)
        if not request.model_dir:
            raise InvalidArgument("model_dir is empty")
        started = time.perf_counter()
        try:
            outcome, info = await self._in_thread(
                lambda: self._load_and_describe(request), self._load_executor
            )
        except Exception as exc:
            self.observer.model_load_failed(
                request.model_id,
                request.architecture,
                time.perf_counter() - started,
                map_exception(exc)[0].name,
            )
            raise
        entry = outcome.entry
        note(architecture=entry.architecture, already_loaded=outcome.already_loaded)
        if info is None:
            raise ModelNotReady(
                f"model {request.model_id!r} was unloaded by another call before this Load could answer; "
                "load it again"
            )
        if not outcome.already_loaded:
            note(load_seconds=round(entry.load_seconds, 6), weight_bytes=info.weight_bytes)
            if entry.model is not None:  # not unloaded meanwhile: its series would outlive it
                self.observer.model_loaded(entry)
        return pb.LoadResponse(model=info, already_loaded=outcome.already_loaded)

    def _load_and_describe(self, request: pb.LoadRequest) -> tuple[LoadOutcome, pb.ModelInfo | None]:
        """Load, and describe the model in the load's thread, from the model the load produced or
        joined: an Unload issued during the Load frees it (entry.model) as soon as the load is done,
        maybe before the event loop looks. The outcome returned holds no model, so nothing keeps it
        alive after an Unload. info is None if the model was gone before a joining Load looked."""
        outcome = self._load_blocking(request)
        model = outcome.model
        try:
            info = self._model_info(outcome.entry, model) if model is not None else None
        except ValueError as exc:  # a number out of a field's range: never leave it READY (ListModels)
            if not outcome.already_loaded:
                del model
                self.registry.unload_model(request.model_id)
            raise InvalidArgument(f"model {request.model_id!r} cannot be described: {exc}") from None
        return LoadOutcome(outcome.entry, outcome.already_loaded), info

    async def preload(self, model_id: str, model_dir: str) -> ModelEntry:
        """A Load at start-up (`--preload ID=DIR`), with the worker's defaults, logged like a Load."""
        request = pb.LoadRequest(model_id=model_id, model_dir=model_dir)
        validate_model_id(model_id)
        started = time.perf_counter()
        outcome = await self._in_thread(lambda: self._load_blocking(request), self._load_executor)
        entry = outcome.entry
        if not outcome.already_loaded:
            self.observer.model_loaded(entry)
        log.info(
            "preloaded",
            extra=fields(
                method="Load",
                model=model_id,
                code="OK",
                duration_s=round(time.perf_counter() - started, 6),
                architecture=entry.architecture,
                model_dir=str(entry.spec.model_dir),
            ),
        )
        return entry

    def _load_blocking(self, request: pb.LoadRequest) -> LoadOutcome:
        device = dev.parse_device(request.device, "device") if request.device else self.default_device
        backend = self.registry.attention_backends.check_name(request.attention_backend)
        # Resolve first: PERMISSION_DENIED / NOT_FOUND before anything inside the directory is read.
        path = self.registry.resolve_dir(request.model_dir)
        kv = request.kv_cache
        options = LoadOptions(
            dtype=self._load_dtype(request.dtype),
            device=str(device),
            is_quant_model=request.is_quant_model,
            quantization=request.quantization.strip().lower(),
            attention_backend=backend,
            enforce_eager=request.enforce_eager,
            compile_decode=request.compile_decode,
            load_mode=self._load_mode(request.load_mode),
            cpu_gemm=self._cpu_gemm(request.cpu_gemm),
            kv_cache=KvCacheOptions(
                block_size=kv.block_size,
                num_blocks=kv.num_blocks,
                max_bytes=kv.max_bytes,
                max_seq_len=kv.max_seq_len,
                max_batch_size=kv.max_batch_size,
            ),
        )
        token = object()
        try:
            return self.registry.load(
                request.model_id,
                path,
                request.architecture or None,
                options,
                admission=functools.partial(self._admit, token),
            )
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            dev.release_cached_memory(device)
            raise OutOfResources(f"out of memory on {device} loading {request.model_id!r}: {exc}") from None
        finally:
            with self._reserve_lock:
                self._reserved.pop(token, None)

    def _load_mode(self, text: str) -> str:
        """ "" → the worker's --load-mode; else mmap or copy."""
        mode = (text or self.settings.load_mode).strip().lower()
        if mode not in LOAD_MODES:
            raise InvalidArgument(f"load_mode {text!r} is not one of {', '.join(LOAD_MODES)}")
        return mode

    def _cpu_gemm(self, text: str) -> str:
        """ "" → the worker's --cpu-gemm; else one of CPU_GEMMS."""
        name = (text or self.settings.cpu_gemm).strip().lower()
        if name not in CPU_GEMMS:
            raise InvalidArgument(f"cpu_gemm {text!r} is not one of {', '.join(CPU_GEMMS)}")
        return name

    def _load_dtype(self, text: str) -> torch.dtype | None:
        """ "" → the worker's default; "auto" → None, which the registry's load plan resolves."""
        name = (text or self.settings.dtype).strip().lower()
        if name in LOAD_DTYPES:
            return LOAD_DTYPES[name]
        if name != "auto":
            raise InvalidArgument(f"dtype {text!r} is not one of auto, float32, float16, bfloat16")
        return None

    def _held_bytes(self) -> int:
        total = 0
        for entry in self.registry.list_models():
            model = entry.model
            if model is not None:
                total += model.weight_bytes + model.cache_spec.total_bytes + model.cuda_graph_bytes
        return total

    def _admit(self, token: object, plan: LoadPlan) -> None:
        """Refuse a load that cannot fit, before anything is allocated (RESOURCE_EXHAUSTED)."""
        device, model_dir = plan.device, plan.model_dir
        check_checkpoint_shapes(plan.config, index_checkpoint(model_dir))  # before anything is allocated
        free = dev.free_bytes(device)
        need = plan.total_bytes
        what = f"{need} bytes (weights {plan.weight_bytes} + KV cache {plan.cache.total_bytes})"
        with self._reserve_lock:
            reserved = sum(self._reserved.values())
            budget = self.settings.memory_budget_bytes
            if budget:
                held = self._held_bytes()
                left = budget - held - reserved
                if need > left:
                    raise OutOfResources(
                        f"loading {model_dir.name} needs {what}, but the worker's memory budget of {budget} bytes "
                        f"has {max(left, 0)} left ({held} held by loaded models, {reserved} by loads in progress)"
                    )
            if need > free - reserved:
                raise OutOfResources(
                    f"loading {model_dir.name} needs {what}, but {device} has {max(free - reserved, 0)} bytes free"
                    + (f" ({reserved} promised to loads in progress)" if reserved else "")
                )
            self._reserved[token] = need

    @rpc_method("Unload")
    async def Unload(self, request: pb.UnloadRequest, context: grpc.aio.ServicerContext) -> pb.UnloadResponse:
        seconds, freed = await self._unload(validate_model_id(request.model_id))
        return pb.UnloadResponse(unload_seconds=seconds, freed_bytes=freed)

    async def _unload(self, model_id: str) -> tuple[float, int]:
        started = time.perf_counter()
        entry = self.registry.get_entry(model_id)

        def unload() -> int:
            # Under the model's lock the id's entry is the one unload_model frees (the one fetched
            # above may have been unloaded while this call waited for the lock).
            current = self.registry.get_entry(model_id)
            current.done.wait()  # a load still running: its model, once built
            model = current.model
            device = model.device if model is not None else None
            survivor = _weak_ref(model)
            del model
            freed = self.registry.unload_model(model_id)
            # Refcounting frees a released model at once; a full collection (~0.1 s with torch
            # loaded, holding the GIL, so the event loop stalls) is needed only when the model
            # outlived its unload, i.e. it sits in a reference cycle.
            dev.release_cached_memory(device, collect=survivor is None or survivor() is not None)
            return freed

        freed = await self._locked(model_id, unload)  # in-flight calls on the model finish first
        seconds = time.perf_counter() - started
        note(architecture=entry.architecture, freed_bytes=freed)
        self.observer.model_unloaded(model_id, entry.architecture, seconds, freed)
        return seconds, freed

    # -- forward passes ------------------------------------------------------------------------
    def _check_caps(self, tokens: int, sequences: int) -> None:
        s = self.settings
        if tokens > s.max_tokens_per_request:
            raise OutOfResources(
                f"request has {tokens} tokens; this worker's cap is {s.max_tokens_per_request}"
            )
        if sequences > s.max_batch_size:
            raise OutOfResources(
                f"request has {sequences} sequences; this worker's cap is {s.max_batch_size}"
            )

    def _check_paged_call(
        self, model: Model, request: pb.ForwardPagedRequest, tokens: int, rows: int
    ) -> None:
        """Block tables within the cache and the call's working memory within bounds, from sizes only."""
        lengths = [len(t.block_ids) for t in request.block_tables]
        limits.check_block_tables(lengths, model.cache_spec.num_blocks)
        estimate = limits.paged_call_bytes(
            model, tokens, len(lengths), sum(lengths), max(lengths), max(rows, 1)
        )
        budget = self.settings.memory_budget_bytes
        left = None
        if budget:
            with self._reserve_lock:
                left = budget - self._held_bytes() - sum(self._reserved.values())
        limits.check_call_memory(estimate, self.settings.max_call_bytes, left)

    def _check_response_size(
        self, rows: int, vocab: int, dtype: torch.dtype, k: int, k_rows: int, seqs: int
    ) -> None:
        size = logits_response_bytes(rows, vocab, dtype, k, k_rows, seqs)
        if size > self.settings.max_message_bytes:
            raise OutOfResources(
                f"the response would be about {size} bytes ({rows} logits rows × {vocab} × {dtype.itemsize} bytes), "
                f"over max_message_bytes {self.settings.max_message_bytes}; ask for LOGITS_LAST, fewer tokens "
                "or a 16-bit logits_dtype"
            )

    @staticmethod
    def _check_top_k(k: int, vocab: int) -> None:
        if k > vocab:
            raise InvalidArgument(f"top_k {k} exceeds the vocabulary size {vocab}")

    @rpc_method("Forward")
    async def Forward(
        self, request: pb.ForwardRequest, context: grpc.aio.ServicerContext
    ) -> pb.ForwardResponse:
        model_id = validate_model_id(request.model_id)
        mode = logits_mode(request.logits_mode)
        out_dtype = logits_dtype(request.logits_dtype)
        batch = request.batch_size or 1
        n = len(request.token_ids)
        limits.check_dense_batch(n, batch)
        self._check_caps(n, batch)
        if n == 0:
            raise InvalidArgument("token_ids is empty")
        if n % batch:
            raise InvalidArgument(f"len(token_ids) = {n} is not a multiple of batch_size {batch}")
        seq_len = n // batch
        if request.positions and len(request.positions) != n:
            raise InvalidArgument(
                f"len(positions) = {len(request.positions)} must equal len(token_ids) = {n}"
            )
        k = request.top_k
        all_rows = mode == pb.LOGITS_ALL
        sampling = sampling_codec.sampling_params(request.sampling, batch, "batch row")
        processed = sampling_codec.processed_logprobs(request.logprobs_mode)

        def run(model: Model) -> pb.ForwardResponse:
            vocab = model.config.vocab_size
            self._check_top_k(k, vocab)
            sampling_codec.check_token_ids(request.sampling, vocab, "batch row")
            rows = {pb.LOGITS_ALL: n, pb.LOGITS_LAST: batch, pb.LOGITS_NONE: 0}[mode]
            self._check_response_size(rows, vocab, out_dtype, k, rows or batch, batch)
            ids = torch.tensor(list(request.token_ids), dtype=torch.long).view(batch, seq_len)
            if request.positions:
                positions = torch.tensor(list(request.positions), dtype=torch.long).view(batch, seq_len)
            elif request.start_pos and not request.use_cache:
                # The proto's default positions are start_pos + [0, seq_len); `forward` starts at 0.
                positions = torch.arange(request.start_pos, request.start_pos + seq_len).expand(
                    batch, seq_len
                )
            else:
                positions = None
            started = time.perf_counter()
            if request.use_cache:
                logits = model.forward_with_cache(
                    ids, request.start_pos, seq_len, positions, all_logits=all_rows
                )
            else:
                logits = model.forward(ids, positions, all_logits=all_rows)
            # logits: [batch, seq, vocab] when all_rows, else [batch, vocab] (last positions)
            last = logits[:, -1] if all_rows else logits
            rows_out = logits.reshape(n, vocab) if all_rows else logits
            context = [request.start_pos + seq_len] * batch
            samples = self.sampler.sample(last, sampling, context, processed_logprobs=processed)
            _synchronize(model.device)
            compute = time.perf_counter() - started  # the forward and the sampling
            return _forward_reply(pb.ForwardResponse(), rows_out, last, mode, out_dtype, k, compute, samples)

        response = await self._on_model(model_id, run)
        phase = _phase_dense(request.use_cache, request.start_pos, seq_len)
        self.observer.forward_done(model_id, "Forward", phase, response.compute_seconds, n)
        return response

    @rpc_method("ForwardPaged")
    async def ForwardPaged(
        self, request: pb.ForwardPagedRequest, context: grpc.aio.ServicerContext
    ) -> pb.ForwardPagedResponse:
        model_id = validate_model_id(request.model_id)
        mode = logits_mode(request.logits_mode)
        out_dtype = logits_dtype(request.logits_dtype)
        n = len(request.input_tokens)
        seqs = len(request.block_tables)
        self._check_caps(n, seqs)
        if n == 0:
            raise InvalidArgument("input_tokens is empty")
        if seqs == 0:
            raise InvalidArgument("block_tables is empty: one block table per sequence is needed")
        for name in ("positions", "slot_mapping"):
            if len(getattr(request, name)) != n:
                raise InvalidArgument(
                    f"len({name}) = {len(getattr(request, name))} must equal len(input_tokens) = {n}"
                )
        if len(request.context_lens) != seqs:
            raise InvalidArgument(
                f"len(context_lens) = {len(request.context_lens)} must equal len(block_tables) = {seqs}"
            )
        if request.query_lens and len(request.query_lens) != seqs:
            raise InvalidArgument(
                f"len(query_lens) = {len(request.query_lens)} must equal len(block_tables) = {seqs}"
            )
        context_lens = list(request.context_lens)
        query_lens, defaulted = resolve_query_lens(context_lens, request.query_lens, request.is_prefill)
        if any(q < 1 for q in query_lens):
            bad = next(i for i, q in enumerate(query_lens) if q < 1)
            raise InvalidArgument(f"query_lens[{bad}] = {query_lens[bad]} must be >= 1")
        # The rest (ranges, blocks, slots) is checked once, by the model's prepare_paged_batch.
        check_token_count("input_tokens", n, query_lens, defaulted)
        k = request.top_k
        all_rows = mode == pb.LOGITS_ALL
        sampling = sampling_codec.sampling_params(request.sampling, seqs, "sequence")
        processed = sampling_codec.processed_logprobs(request.logprobs_mode)
        num_drafts = sampling_codec.draft_counts(request.num_draft_tokens, query_lens)
        drafts = sampling_codec.draft_tokens(request.input_tokens, query_lens, num_drafts)
        # Verification scores every draft position: only those rows (or all of them for LOGITS_ALL).
        verify = {"logits_indices": verification_rows(query_lens, num_drafts)} if any(num_drafts) else {}

        def run(model: Model) -> pb.ForwardPagedResponse:
            vocab = model.config.vocab_size
            self._check_top_k(k, vocab)
            sampling_codec.check_token_ids(request.sampling, vocab, "sequence")
            rows = {pb.LOGITS_ALL: n, pb.LOGITS_LAST: seqs, pb.LOGITS_NONE: 0}[mode]
            self._check_response_size(rows, vocab, out_dtype, k, rows or seqs, seqs)
            self._check_paged_call(model, request, n, rows)
            started = time.perf_counter()
            logits = model.forward_paged(
                # plain lists: a decode step's few integers are checked in Python (paged_batch.py)
                list(request.input_tokens),
                list(request.positions),
                [list(table.block_ids) for table in request.block_tables],
                list(request.slot_mapping),
                context_lens,
                request.is_prefill,
                list(request.query_lens) or None,
                all_logits=all_rows,
                **({} if all_rows else verify),
            )
            if all_rows:
                # [num_tokens, vocab]; each sequence's last query token ends its run of query_lens.
                ends = torch.tensor(query_lens, device=logits.device).cumsum(0) - 1
                last = logits[ends]
                scored = logits[verify["logits_indices"]] if verify else last
            elif verify:  # [sum(d + 1), vocab]: each sequence's rows end with its last query token
                scored = logits
                last = logits[torch.tensor([d + 1 for d in num_drafts], device=logits.device).cumsum(0) - 1]
            else:
                last = scored = logits  # [num_seqs, vocab]
            samples = self.sampler.sample(scored, sampling, context_lens, drafts, processed)
            _synchronize(model.device)
            compute = time.perf_counter() - started  # the forward and the sampling
            returned = logits if all_rows else last
            return _forward_reply(
                pb.ForwardPagedResponse(), returned, last, mode, out_dtype, k, compute, samples
            )

        response = await self._on_model(model_id, run)
        phase = _phase_paged(request.is_prefill, query_lens, context_lens)
        self.observer.forward_done(model_id, "ForwardPaged", phase, response.compute_seconds, n)
        return response

    # -- caches --------------------------------------------------------------------------------
    @rpc_method("ResetCache")
    async def ResetCache(
        self, request: pb.ResetCacheRequest, context: grpc.aio.ServicerContext
    ) -> pb.ResetCacheResponse:
        model_id = validate_model_id(request.model_id)
        await self._on_model(model_id, lambda model: model.reset_kv_cache())
        return pb.ResetCacheResponse()

    @rpc_method("SliceKvCache")
    async def SliceKvCache(
        self, request: pb.SliceKvCacheRequest, context: grpc.aio.ServicerContext
    ) -> pb.SliceKvCacheResponse:
        model_id = validate_model_id(request.model_id)

        def run(model: Model) -> pb.SliceKvCacheResponse:
            limits.check_slice(model, request.start_pos, request.length)
            c, spec = model.config, model.cache_spec
            size = (
                2
                * spec.max_batch_size
                * c.num_key_value_heads
                * request.length
                * c.head_dim
                * model.dtype.itemsize
            )
            if size > self.settings.max_message_bytes:
                raise OutOfResources(
                    f"K and V of {request.length} positions take {size} bytes, over max_message_bytes "
                    f"{self.settings.max_message_bytes}; slice fewer positions"
                )
            k, v = model.slice_kv_cache(request.layer_idx, request.start_pos, request.length)
            response = pb.SliceKvCacheResponse()
            encode_tensor(k, response.key)
            encode_tensor(v, response.value)
            return response

        return await self._on_model(model_id, run)

    # -- KV block transfer (worker/kv_transfer.py) ---------------------------------------------
    @rpc_method("ExportKvBlocks")
    async def ExportKvBlocks(
        self, request: pb.ExportKvBlocksRequest, context: grpc.aio.ServicerContext
    ) -> None:
        await kv_transfer.export_blocks(self, request, context)  # chunks go out through context.write

    @rpc_method("ImportKvBlocks")
    async def ImportKvBlocks(
        self, request_iterator: AsyncIterator[pb.KvBlocksChunk], context: grpc.aio.ServicerContext
    ) -> pb.ImportKvBlocksResponse:
        return await kv_transfer.import_blocks(self, request_iterator, context)

    # -- read-only -----------------------------------------------------------------------------
    @rpc_method("ListModels")
    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[self._model_info(e) for e in self.registry.list_models()])

    @rpc_method("ListArchitectures")
    async def ListArchitectures(
        self, request: pb.ListArchitecturesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListArchitecturesResponse:
        return pb.ListArchitecturesResponse(architectures=self.registry.list_architectures())

    @rpc_method("Info")
    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.InfoResponse:
        s = self.settings
        default_dtype = s.dtype
        if default_dtype == "auto" and self.default_device.type != "cuda":
            default_dtype = "float32"
        # Off the event loop: the device probes ask the driver (NVML) and may import flash_attn.
        devices, backends = await asyncio.to_thread(
            lambda: (dev.all_devices(), self.registry.attention_backends.available(*_machine_devices()))
        )
        return pb.InfoResponse(
            version=__version__,
            devices=[
                pb.DeviceInfo(
                    name=d.name,
                    description=d.description,
                    total_memory_bytes=d.total_bytes,
                    free_memory_bytes=d.free_bytes,
                )
                for d in devices
            ],
            default_device=str(self.default_device),
            default_dtype=default_dtype,
            attention_backends=backends,
            limits=pb.Limits(
                max_message_bytes=s.max_message_bytes,
                max_tokens_per_request=s.max_tokens_per_request,
                max_batch_size=s.max_batch_size,
            ),
            model_roots=[os.path.realpath(r) for r in self.registry.model_roots],
            architectures=self.registry.list_architectures(),
            world_size=s.tensor_parallel_size,
            threads=self.compute_threads,
        )

    # -- encoding ------------------------------------------------------------------------------
    def _model_info(self, entry: ModelEntry, model: Model | None = None) -> pb.ModelInfo:
        """The entry's info; `model` (a snapshot taken by the caller) instead of entry.model."""
        spec = entry.spec
        info = pb.ModelInfo(
            id=entry.model_id,
            architecture=entry.architecture,
            model_dir=str(spec.model_dir),
            device=spec.options.device or str(self.default_device),
            dtype=dtype_name(spec.options.dtype),
            state=STATE_TO_PB[entry.state],
            is_quant_model=spec.options.is_quant_model,
            attention_backend=spec.options.attention_backend,
            weights_version=entry.weights_version,
            released=released_tags(entry),
        )
        model = model if model is not None else entry.model
        if model is None:
            return info
        c, cache = model.config, model.cache_spec
        info.device = str(model.device)
        info.dtype = dtype_name(model.dtype)
        info.num_parameters = model.num_parameters
        info.weight_bytes = model.weight_bytes
        info.quantization = model.quantization
        info.kv_cache_bytes = cache.total_bytes
        info.vocab_size = c.vocab_size
        info.hidden_size = c.hidden_size
        info.num_layers = c.num_hidden_layers
        info.num_attention_heads = c.num_attention_heads
        info.num_kv_heads = c.num_key_value_heads
        info.head_dim = c.head_dim
        info.max_position_embeddings = c.max_position_embeddings
        info.sliding_window = c.sliding_window or 0
        info.kv_block_size = cache.block_size
        info.kv_num_blocks = cache.num_blocks
        info.max_seq_len = cache.max_seq_len
        info.max_batch_size = cache.max_batch_size
        info.attention_backend = model.attention_backend
        info.cuda_graph_batch_sizes.extend(model.cuda_graph_batch_sizes)
        info.cuda_graph_bytes = model.cuda_graph_bytes
        info.tensor_parallel_size = getattr(model, "tensor_parallel_size", 1)
        info.load_mode = model.load_mode
        info.mapped_weight_bytes = model.mapped_weight_bytes
        info.compile_seconds = model.compile_seconds
        info.cpu_gemm = model.cpu_gemm
        info.load_seconds = entry.load_seconds
        info.loaded_at.FromNanoseconds(int(entry.loaded_at * 1e9))
        return info

    # -- shutdown ------------------------------------------------------------------------------
    async def unload_all(self) -> list[str]:
        """Unload every model (after the server stopped taking calls); returns the ids unloaded."""
        done = []
        for entry in self.registry.list_models():
            try:
                seconds, freed = await self._unload(entry.model_id)
            except Exception:  # a load that failed meanwhile, or already gone: nothing to free
                continue
            log.info(
                "unloaded at shutdown",
                extra=fields(model=entry.model_id, duration_s=round(seconds, 6), freed_bytes=freed),
            )
            done.append(entry.model_id)
        return done


def _forward_reply(
    response: pb.ForwardResponse | pb.ForwardPagedResponse,
    rows: torch.Tensor,
    last: torch.Tensor,
    mode: int,
    out_dtype: torch.dtype,
    k: int,
    compute: float,
    samples: list[SequenceSample],
) -> pb.ForwardResponse | pb.ForwardPagedResponse:
    """rows: the logits rows the mode returns [rows, vocab]; last: each sequence's last row [seqs, vocab].
    Both float32; top_k comes from float32 whatever the wire dtype is. samples: what each sequence
    emitted (next_token_ids is the last of them, the argmax without sampling)."""
    response.compute_seconds = compute
    sampling_codec.fill_outputs(response, samples)
    if mode != pb.LOGITS_NONE:
        encode_tensor(rows.to(out_dtype), response.logits)
    if k:
        ids, logprobs = top_k(rows if mode != pb.LOGITS_NONE else last, k)
        fill_top_k(response.top_k, ids, logprobs)
    return response


def _weak_ref(obj: object) -> weakref.ref | None:
    """A weak reference to obj, or None when there is no object or it takes no weak references."""
    try:
        return weakref.ref(obj) if obj is not None else None
    except TypeError:
        return None


def _inference(fn: Callable[[], T]) -> T:
    with torch.inference_mode():
        try:
            return fn()
        except StopIteration as exc:
            # An asyncio future refuses StopIteration (TypeError in the loop's callback): the caller
            # would never get a reply. As a RuntimeError it reaches the caller, as INTERNAL.
            raise RuntimeError(f"model work raised StopIteration {exc!r}") from exc


def _consume(future: asyncio.Future) -> None:
    """Retrieve the result of a future nobody awaits any more (a cancelled caller's)."""
    if not future.cancelled():
        future.exception()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _machine_devices() -> list[torch.device]:
    """The device kinds of this machine, for the backends Info lists (dtype and block size are per Load)."""
    return [torch.device("cuda")] if torch.cuda.is_available() else [torch.device("cpu")]


__all__ = ["ModelWorkerServicer", "dtype_name"]
