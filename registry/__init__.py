"""The model registry: architectures → builders, ids → loaded models, and the weight loader."""

from .config import ModelConfig, RopeScaling
from .discovery import ENTRY_POINT_GROUP, load_entry_point_architectures
from .errors import (
    CorruptCheckpoint,
    FailedPrecondition,
    IncompatibleLayout,
    InvalidArgument,
    InvalidConfig,
    InvalidRequest,
    ModelAlreadyExists,
    ModelDirNotFound,
    ModelNotFound,
    ModelNotReady,
    ModelWorkerError,
    NotFound,
    OutOfResources,
    PermissionDenied,
    UnknownArchitecture,
    UnsafeCheckpoint,
    WeightsMismatch,
)
from .model import CacheSpec, KvCacheOptions, KvLayout, LoadOptions, Model, ModelBuilder
from .registry import LoadOutcome, ModelEntry, ModelRegistry, ModelState, validate_model_id
from .weights import LLAMA_STYLE_MAPPING, FusedPart, WeightMapping

__all__ = [
    "ENTRY_POINT_GROUP",
    "LLAMA_STYLE_MAPPING",
    "CacheSpec",
    "CorruptCheckpoint",
    "FailedPrecondition",
    "IncompatibleLayout",
    "FusedPart",
    "InvalidArgument",
    "InvalidConfig",
    "InvalidRequest",
    "KvCacheOptions",
    "KvLayout",
    "LoadOptions",
    "LoadOutcome",
    "Model",
    "ModelAlreadyExists",
    "ModelBuilder",
    "ModelConfig",
    "ModelDirNotFound",
    "ModelEntry",
    "ModelNotFound",
    "ModelNotReady",
    "ModelRegistry",
    "ModelState",
    "ModelWorkerError",
    "NotFound",
    "OutOfResources",
    "PermissionDenied",
    "RopeScaling",
    "UnknownArchitecture",
    "UnsafeCheckpoint",
    "WeightMapping",
    "WeightsMismatch",
    "load_entry_point_architectures",
    "validate_model_id",
]
