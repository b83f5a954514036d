import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    INT32: _ClassVar[DType]
    INT64: _ClassVar[DType]
    INT8: _ClassVar[DType]
    UINT8: _ClassVar[DType]
    FLOAT8_E4M3FN: _ClassVar[DType]
    INT16: _ClassVar[DType]

class LogitsMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LOGITS_LAST: _ClassVar[LogitsMode]
    LOGITS_ALL: _ClassVar[LogitsMode]
    LOGITS_NONE: _ClassVar[LogitsMode]

class ModelState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_STATE_UNSPECIFIED: _ClassVar[ModelState]
    LOADING: _ClassVar[ModelState]
    READY: _ClassVar[ModelState]
    UNLOADING: _ClassVar[ModelState]
    SLEEPING: _ClassVar[ModelState]

class LogprobsMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LOGPROBS_RAW: _ClassVar[LogprobsMode]
    LOGPROBS_PROCESSED: _ClassVar[LogprobsMode]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT16: DType
BFLOAT16: DType
INT32: DType
INT64: DType
INT8: DType
UINT8: DType
FLOAT8_E4M3FN: DType
INT16: DType
LOGITS_LAST: LogitsMode
LOGITS_ALL: LogitsMode
LOGITS_NONE: LogitsMode
MODEL_STATE_UNSPECIFIED: ModelState
LOADING: ModelState
READY: ModelState
UNLOADING: ModelState
SLEEPING: ModelState
LOGPROBS_RAW: LogprobsMode
LOGPROBS_PROCESSED: LogprobsMode

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "seed", "prompt_token_ids", "output_token_ids", "logprobs")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repetition_penalty: float
    presence_penalty: float
    frequency_penalty: float
    seed: int
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    output_token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: int
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., min_p: _Optional[float] = ..., repetition_penalty: _Optional[float] = ..., presence_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ..., seed: _Optional[int] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., output_token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[int] = ...) -> None: ...

class TokenLogprob(_message.Message):
    __slots__ = ("token_id", "logprob", "rank", "top_token_ids", "top_logprobs")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    TOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: float
    rank: int
    top_token_ids: _containers.RepeatedScalarFieldContainer[int]
    top_logprobs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, token_id: _Optional[int] = ..., logprob: _Optional[float] = ..., rank: _Optional[int] = ..., top_token_ids: _Optional[_Iterable[int]] = ..., top_logprobs: _Optional[_Iterable[float]] = ...) -> None: ...

class SequenceOutput(_message.Message):
    __slots__ = ("token_ids", "num_accepted_drafts", "logprobs")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_ACCEPTED_DRAFTS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    num_accepted_drafts: int
    logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., num_accepted_drafts: _Optional[int] = ..., logprobs: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ...) -> None: ...

class KvCacheConfig(_message.Message):
    __slots__ = ("block_size", "num_blocks", "max_bytes", "max_seq_len", "max_batch_size")
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    block_size: int
    num_blocks: int
    max_bytes: int
    max_seq_len: int
    max_batch_size: int
    def __init__(self, block_size: _Optional[int] = ..., num_blocks: _Optional[int] = ..., max_bytes: _Optional[int] = ..., max_seq_len: _Optional[int] = ..., max_batch_size: _Optional[int] = ...) -> None: ...

class LoadRequest(_message.Message):
    __slots__ = ("model_id", "model_dir", "architecture", "is_quant_model", "dtype", "device", "kv_cache", "attention_backend", "quantization", "enforce_eager", "load_mode", "compile_decode", "cpu_gemm")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_DIR_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    IS_QUANT_MODEL_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_BACKEND_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    ENFORCE_EAGER_FIELD_NUMBER: _ClassVar[int]
    LOAD_MODE_FIELD_NUMBER: _ClassVar[int]
    COMPILE_DECODE_FIELD_NUMBER: _ClassVar[int]
    CPU_GEMM_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    model_dir: str
    architecture: str
    is_quant_model: bool
    dtype: str
    device: str
    kv_cache: KvCacheConfig
    attention_backend: str
    quantization: str
    enforce_eager: bool
    load_mode: str
    compile_decode: bool
    cpu_gemm: str
    def __init__(self, model_id: _Optional[str] = ..., model_dir: _Optional[str] = ..., architecture: _Optional[str] = ..., is_quant_model: _Optional[bool] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., kv_cache: _Optional[_Union[KvCacheConfig, _Mapping]] = ..., attention_backend: _Optional[str] = ..., quantization: _Optional[str] = ..., enforce_eager: _Optional[bool] = ..., load_mode: _Optional[str] = ..., compile_decode: _Optional[bool] = ..., cpu_gemm: _Optional[str] = ...) -> None: ...

class LoadResponse(_message.Message):
    __slots__ = ("model", "already_loaded")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ALREADY_LOADED_FIELD_NUMBER: _ClassVar[int]
    model: ModelInfo
    already_loaded: bool
    def __init__(self, model: _Optional[_Union[ModelInfo, _Mapping]] = ..., already_loaded: _Optional[bool] = ...) -> None: ...

class UnloadRequest(_message.Message):
    __slots__ = ("model_id",)
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    def __init__(self, model_id: _Optional[str] = ...) -> None: ...

class UnloadResponse(_message.Message):
    __slots__ = ("unload_seconds", "freed_bytes")
    UNLOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FREED_BYTES_FIELD_NUMBER: _ClassVar[int]
    unload_seconds: float
    freed_bytes: int
    def __init__(self, unload_seconds: _Optional[float] = ..., freed_bytes: _Optional[int] = ...) -> None: ...

class TopK(_message.Message):
    __slots__ = ("token_ids", "logprobs")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[float]] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("model_id", "token_ids", "batch_size", "positions", "use_cache", "start_pos", "logits_mode", "logits_dtype", "top_k", "sampling", "logprobs_mode")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    USE_CACHE_FIELD_NUMBER: _ClassVar[int]
    START_POS_FIELD_NUMBER: _ClassVar[int]
    LOGITS_MODE_FIELD_NUMBER: _ClassVar[int]
    LOGITS_DTYPE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_MODE_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    batch_size: int
    positions: _containers.RepeatedScalarFieldContainer[int]
    use_cache: bool
    start_pos: int
    logits_mode: LogitsMode
    logits_dtype: DType
    top_k: int
    sampling: _containers.RepeatedCompositeFieldContainer[SamplingParams]
    logprobs_mode: LogprobsMode
    def __init__(self, model_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., batch_size: _Optional[int] = ..., positions: _Optional[_Iterable[int]] = ..., use_cache: _Optional[bool] = ..., start_pos: _Optional[int] = ..., logits_mode: _Optional[_Union[LogitsMode, str]] = ..., logits_dtype: _Optional[_Union[DType, str]] = ..., top_k: _Optional[int] = ..., sampling: _Optional[_Iterable[_Union[SamplingParams, _Mapping]]] = ..., logprobs_mode: _Optional[_Union[LogprobsMode, str]] = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("logits", "next_token_ids", "top_k", "compute_seconds", "outputs", "weights_version")
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    NEXT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_VERSION_FIELD_NUMBER: _ClassVar[int]
    logits: Tensor
    next_token_ids: _containers.RepeatedScalarFieldContainer[int]
    top_k: _containers.RepeatedCompositeFieldContainer[TopK]
    compute_seconds: float
    outputs: _containers.RepeatedCompositeFieldContainer[SequenceOutput]
    weights_version: int
    def __init__(self, logits: _Optional[_Union[Tensor, _Mapping]] = ..., next_token_ids: _Optional[_Iterable[int]] = ..., top_k: _Optional[_Iterable[_Union[TopK, _Mapping]]] = ..., compute_seconds: _Optional[float] = ..., outputs: _Optional[_Iterable[_Union[SequenceOutput, _Mapping]]] = ..., weights_version: _Optional[int] = ...) -> None: ...

class BlockTable(_message.Message):
    __slots__ = ("block_ids",)
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, block_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ForwardPagedRequest(_message.Message):
    __slots__ = ("model_id", "input_tokens", "positions", "block_tables", "slot_mapping", "context_lens", "is_prefill", "query_lens", "logits_mode", "logits_dtype", "top_k", "sampling", "logprobs_mode", "num_draft_tokens")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_TABLES_FIELD_NUMBER: _ClassVar[int]
    SLOT_MAPPING_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENS_FIELD_NUMBER: _ClassVar[int]
    IS_PREFILL_FIELD_NUMBER: _ClassVar[int]
    QUERY_LENS_FIELD_NUMBER: _ClassVar[int]
    LOGITS_MODE_FIELD_NUMBER: _ClassVar[int]
    LOGITS_DTYPE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_MODE_FIELD_NUMBER: _ClassVar[int]
    NUM_DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    input_tokens: _containers.RepeatedScalarFieldContainer[int]
    positions: _containers.RepeatedScalarFieldContainer[int]
    block_tables: _containers.RepeatedCompositeFieldContainer[BlockTable]
    slot_mapping: _containers.RepeatedScalarFieldContainer[int]
    context_lens: _containers.RepeatedScalarFieldContainer[int]
    is_prefill: bool
    query_lens: _containers.RepeatedScalarFieldContainer[int]
    logits_mode: LogitsMode
    logits_dtype: DType
    top_k: int
    sampling: _containers.RepeatedCompositeFieldContainer[SamplingParams]
    logprobs_mode: LogprobsMode
    num_draft_tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, model_id: _Optional[str] = ..., input_tokens: _Optional[_Iterable[int]] = ..., positions: _Optional[_Iterable[int]] = ..., block_tables: _Optional[_Iterable[_Union[BlockTable, _Mapping]]] = ..., slot_mapping: _Optional[_Iterable[int]] = ..., context_lens: _Optional[_Iterable[int]] = ..., is_prefill: _Optional[bool] = ..., query_lens: _Optional[_Iterable[int]] = ..., logits_mode: _Optional[_Union[LogitsMode, str]] = ..., logits_dtype: _Optional[_Union[DType, str]] = ..., top_k: _Optional[int] = ..., sampling: _Optional[_Iterable[_Union[SamplingParams, _Mapping]]] = ..., logprobs_mode: _Optional[_Union[LogprobsMode, str]] = ..., num_draft_tokens: _Optional[_Iterable[int]] = ...) -> None: ...

class ForwardPagedResponse(_message.Message):
    __slots__ = ("logits", "next_token_ids", "top_k", "compute_seconds", "outputs", "weights_version")
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    NEXT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_VERSION_FIELD_NUMBER: _ClassVar[int]
    logits: Tensor
    next_token_ids: _containers.RepeatedScalarFieldContainer[int]
    top_k: _containers.RepeatedCompositeFieldContainer[TopK]
    compute_seconds: float
    outputs: _containers.RepeatedCompositeFieldContainer[SequenceOutput]
    weights_version: int
    def __init__(self, logits: _Optional[_Union[Tensor, _Mapping]] = ..., next_token_ids: _Optional[_Iterable[int]] = ..., top_k: _Optional[_Iterable[_Union[TopK, _Mapping]]] = ..., compute_seconds: _Optional[float] = ..., outputs: _Optional[_Iterable[_Union[SequenceOutput, _Mapping]]] = ..., weights_version: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("id", "architecture", "model_dir", "device", "dtype", "state", "num_parameters", "weight_bytes", "kv_cache_bytes", "vocab_size", "hidden_size", "num_layers", "num_attention_heads", "num_kv_heads", "head_dim", "max_position_embeddings", "sliding_window", "kv_block_size", "kv_num_blocks", "max_seq_len", "max_batch_size", "attention_backend", "is_quant_model", "load_seconds", "loaded_at", "quantization", "tensor_parallel_size", "weights_version", "cuda_graph_batch_sizes", "load_mode", "cuda_graph_bytes", "released", "buffer_bytes", "mapped_weight_bytes", "compile_seconds", "cpu_gemm")
    ID_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    MODEL_DIR_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    NUM_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_ATTENTION_HEADS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    MAX_POSITION_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    SLIDING_WINDOW_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    KV_NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_BACKEND_FIELD_NUMBER: _ClassVar[int]
    IS_QUANT_MODEL_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LOADED_AT_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    TENSOR_PARALLEL_SIZE_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_VERSION_FIELD_NUMBER: _ClassVar[int]
    CUDA_GRAPH_BATCH_SIZES_FIELD_NUMBER: _ClassVar[int]
    LOAD_MODE_FIELD_NUMBER: _ClassVar[int]
    CUDA_GRAPH_BYTES_FIELD_NUMBER: _ClassVar[int]
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    BUFFER_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAPPED_WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    COMPILE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CPU_GEMM_FIELD_NUMBER: _ClassVar[int]
    id: str
    architecture: str
    model_dir: str
    device: str
    dtype: str
    state: ModelState
    num_parameters: int
    weight_bytes: int
    kv_cache_bytes: int
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    sliding_window: int
    kv_block_size: int
    kv_num_blocks: int
    max_seq_len: int
    max_batch_size: int
    attention_backend: str
    is_quant_model: bool
    load_seconds: float
    loaded_at: _timestamp_pb2.Timestamp
    quantization: str
    tensor_parallel_size: int
    weights_version: int
    cuda_graph_batch_sizes: _containers.RepeatedScalarFieldContainer[int]
    load_mode: str
    cuda_graph_bytes: int
    released: _containers.RepeatedScalarFieldContainer[str]
    buffer_bytes: int
    mapped_weight_bytes: int
    compile_seconds: float
    cpu_gemm: str
    def __init__(self, id: _Optional[str] = ..., architecture: _Optional[str] = ..., model_dir: _Optional[str] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., state: _Optional[_Union[ModelState, str]] = ..., num_parameters: _Optional[int] = ..., weight_bytes: _Optional[int] = ..., kv_cache_bytes: _Optional[int] = ..., vocab_size: _Optional[int] = ..., hidden_size: _Optional[int] = ..., num_layers: _Optional[int] = ..., num_attention_heads: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., max_position_embeddings: _Optional[int] = ..., sliding_window: _Optional[int] = ..., kv_block_size: _Optional[int] = ..., kv_num_blocks: _Optional[int] = ..., max_seq_len: _Optional[int] = ..., max_batch_size: _Optional[int] = ..., attention_backend: _Optional[str] = ..., is_quant_model: _Optional[bool] = ..., load_seconds: _Optional[float] = ..., loaded_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., quantization: _Optional[str] = ..., tensor_parallel_size: _Optional[int] = ..., weights_version: _Optional[int] = ..., cuda_graph_batch_sizes: _Optional[_Iterable[int]] = ..., load_mode: _Optional[str] = ..., cuda_graph_bytes: _Optional[int] = ..., released: _Optional[_Iterable[str]] = ..., buffer_bytes: _Optional[int] = ..., mapped_weight_bytes: _Optional[int] = ..., compile_seconds: _Optional[float] = ..., cpu_gemm: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class ListArchitecturesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListArchitecturesResponse(_message.Message):
    __slots__ = ("architectures",)
    ARCHITECTURES_FIELD_NUMBER: _ClassVar[int]
    architectures: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, architectures: _Optional[_Iterable[str]] = ...) -> None: ...

class ResetCacheRequest(_message.Message):
    __slots__ = ("model_id",)
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    def __init__(self, model_id: _Optional[str] = ...) -> None: ...

class ResetCacheResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SliceKvCacheRequest(_message.Message):
    __slots__ = ("model_id", "layer_idx", "start_pos", "length")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_IDX_FIELD_NUMBER: _ClassVar[int]
    START_POS_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    layer_idx: int
    start_pos: int
    length: int
    def __init__(self, model_id: _Optional[str] = ..., layer_idx: _Optional[int] = ..., start_pos: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class SliceKvCacheResponse(_message.Message):
    __slots__ = ("key", "value")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    key: Tensor
    value: Tensor
    def __init__(self, key: _Optional[_Union[Tensor, _Mapping]] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DeviceInfo(_message.Message):
    __slots__ = ("name", "description", "total_memory_bytes", "free_memory_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    FREE_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    total_memory_bytes: int
    free_memory_bytes: int
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., total_memory_bytes: _Optional[int] = ..., free_memory_bytes: _Optional[int] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_message_bytes", "max_tokens_per_request", "max_batch_size")
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    max_message_bytes: int
    max_tokens_per_request: int
    max_batch_size: int
    def __init__(self, max_message_bytes: _Optional[int] = ..., max_tokens_per_request: _Optional[int] = ..., max_batch_size: _Optional[int] = ...) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("version", "devices", "default_device", "default_dtype", "attention_backends", "limits", "model_roots", "architectures", "world_size", "threads")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_DEVICE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_BACKENDS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    MODEL_ROOTS_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURES_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    version: str
    devices: _containers.RepeatedCompositeFieldContainer[DeviceInfo]
    default_device: str
    default_dtype: str
    attention_backends: _containers.RepeatedScalarFieldContainer[str]
    limits: Limits
    model_roots: _containers.RepeatedScalarFieldContainer[str]
    architectures: _containers.RepeatedScalarFieldContainer[str]
    world_size: int
    threads: int
    def __init__(self, version: _Optional[str] = ..., devices: _Optional[_Iterable[_Union[DeviceInfo, _Mapping]]] = ..., default_device: _Optional[str] = ..., default_dtype: _Optional[str] = ..., attention_backends: _Optional[_Iterable[str]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., model_roots: _Optional[_Iterable[str]] = ..., architectures: _Optional[_Iterable[str]] = ..., world_size: _Optional[int] = ..., threads: _Optional[int] = ...) -> None: ...

class UpdateWeightsRequest(_message.Message):
    __slots__ = ("model_id", "model_dir")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_DIR_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    model_dir: str
    def __init__(self, model_id: _Optional[str] = ..., model_dir: _Optional[str] = ...) -> None: ...

class UpdateWeightsResponse(_message.Message):
    __slots__ = ("weights_version", "update_seconds", "num_tensors", "bytes")
    WEIGHTS_VERSION_FIELD_NUMBER: _ClassVar[int]
    UPDATE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    NUM_TENSORS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    weights_version: int
    update_seconds: float
    num_tensors: int
    bytes: int
    def __init__(self, weights_version: _Optional[int] = ..., update_seconds: _Optional[float] = ..., num_tensors: _Optional[int] = ..., bytes: _Optional[int] = ...) -> None: ...

class WeightsChunk(_message.Message):
    __slots__ = ("model_id", "name", "tensor", "offset", "total_bytes")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    name: str
    tensor: Tensor
    offset: int
    total_bytes: int
    def __init__(self, model_id: _Optional[str] = ..., name: _Optional[str] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ..., offset: _Optional[int] = ..., total_bytes: _Optional[int] = ...) -> None: ...

class InitWeightsGroupRequest(_message.Message):
    __slots__ = ("model_id", "master_address", "master_port", "world_size", "rank_offset", "group_name", "backend", "timeout_seconds")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MASTER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MASTER_PORT_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    RANK_OFFSET_FIELD_NUMBER: _ClassVar[int]
    GROUP_NAME_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    master_address: str
    master_port: int
    world_size: int
    rank_offset: int
    group_name: str
    backend: str
    timeout_seconds: float
    def __init__(self, model_id: _Optional[str] = ..., master_address: _Optional[str] = ..., master_port: _Optional[int] = ..., world_size: _Optional[int] = ..., rank_offset: _Optional[int] = ..., group_name: _Optional[str] = ..., backend: _Optional[str] = ..., timeout_seconds: _Optional[float] = ...) -> None: ...

class InitWeightsGroupResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TensorShape(_message.Message):
    __slots__ = ("dims",)
    DIMS_FIELD_NUMBER: _ClassVar[int]
    dims: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, dims: _Optional[_Iterable[int]] = ...) -> None: ...

class UpdateWeightsFromDistributedRequest(_message.Message):
    __slots__ = ("model_id", "group_name", "names", "dtypes", "shapes")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_NAME_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    DTYPES_FIELD_NUMBER: _ClassVar[int]
    SHAPES_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    group_name: str
    names: _containers.RepeatedScalarFieldContainer[str]
    dtypes: _containers.RepeatedScalarFieldContainer[DType]
    shapes: _containers.RepeatedCompositeFieldContainer[TensorShape]
    def __init__(self, model_id: _Optional[str] = ..., group_name: _Optional[str] = ..., names: _Optional[_Iterable[str]] = ..., dtypes: _Optional[_Iterable[_Union[DType, str]]] = ..., shapes: _Optional[_Iterable[_Union[TensorShape, _Mapping]]] = ...) -> None: ...

class DestroyWeightsGroupRequest(_message.Message):
    __slots__ = ("group_name",)
    GROUP_NAME_FIELD_NUMBER: _ClassVar[int]
    group_name: str
    def __init__(self, group_name: _Optional[str] = ...) -> None: ...

class DestroyWeightsGroupResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReleaseMemoryRequest(_message.Message):
    __slots__ = ("model_id", "tags", "offload")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    OFFLOAD_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    tags: _containers.RepeatedScalarFieldContainer[str]
    offload: bool
    def __init__(self, model_id: _Optional[str] = ..., tags: _Optional[_Iterable[str]] = ..., offload: _Optional[bool] = ...) -> None: ...

class ReleaseMemoryResponse(_message.Message):
    __slots__ = ("released_bytes", "release_seconds")
    RELEASED_BYTES_FIELD_NUMBER: _ClassVar[int]
    RELEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    released_bytes: int
    release_seconds: float
    def __init__(self, released_bytes: _Optional[int] = ..., release_seconds: _Optional[float] = ...) -> None: ...

class ResumeMemoryRequest(_message.Message):
    __slots__ = ("model_id", "tags")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    tags: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model_id: _Optional[str] = ..., tags: _Optional[_Iterable[str]] = ...) -> None: ...

class ResumeMemoryResponse(_message.Message):
    __slots__ = ("resume_seconds", "resumed_bytes")
    RESUME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RESUMED_BYTES_FIELD_NUMBER: _ClassVar[int]
    resume_seconds: float
    resumed_bytes: int
    def __init__(self, resume_seconds: _Optional[float] = ..., resumed_bytes: _Optional[int] = ...) -> None: ...

class ExportKvBlocksRequest(_message.Message):
    __slots__ = ("model_id", "block_ids")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, model_id: _Optional[str] = ..., block_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class KvLayout(_message.Message):
    __slots__ = ("num_layers", "block_size", "num_kv_heads", "head_dim", "dtype")
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: DType
    def __init__(self, num_layers: _Optional[int] = ..., block_size: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class KvBlocksChunk(_message.Message):
    __slots__ = ("model_id", "dst_block_ids", "layout", "layer_start", "layer_end", "block_ids", "key", "value")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    DST_BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    dst_block_ids: _containers.RepeatedScalarFieldContainer[int]
    layout: KvLayout
    layer_start: int
    layer_end: int
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    key: Tensor
    value: Tensor
    def __init__(self, model_id: _Optional[str] = ..., dst_block_ids: _Optional[_Iterable[int]] = ..., layout: _Optional[_Union[KvLayout, _Mapping]] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., block_ids: _Optional[_Iterable[int]] = ..., key: _Optional[_Union[Tensor, _Mapping]] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ImportKvBlocksResponse(_message.Message):
    __slots__ = ("blocks", "bytes")
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    blocks: int
    bytes: int
    def __init__(self, blocks: _Optional[int] = ..., bytes: _Optional[int] = ...) -> None: ...
