"""The model registry: architectures → builders, ids → loaded models, and the weight loader."""

from .backends import BackendRegistry, BackendRequirements
from .config import ModelConfig, RopeScaling
from .discovery import ENTRY_POINT_GROUP, load_entry_point_architectures
from .errors import (
    CorruptCheckpoint,
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
from .load_plan import LoadPlan, resolve_dtype
from .model import CacheSpec, KvCacheOptions, LoadOptions, Model, ModelBuilder
from .registry import LoadOutcome, ModelEntry, ModelRegistry, ModelState, validate_model_id
from .weights import ExpertPart, FusedPart, WeightMapping, WeightTarget

__all__ = [
    "ENTRY_POINT_GROUP",
    "BackendRegistry",
    "BackendRequirements",
    "CacheSpec",
    "CorruptCheckpoint",
    "ExpertPart",
    "FusedPart",
    "InvalidArgument",
    "InvalidConfig",
    "InvalidRequest",
    "KvCacheOptions",
    "LoadOptions",
    "LoadOutcome",
    "LoadPlan",
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
    "WeightTarget",
    "WeightsMismatch",
    "load_entry_point_architectures",
    "resolve_dtype",
    "validate_model_id",
]
