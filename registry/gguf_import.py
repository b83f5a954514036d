"""GGUF import: the entry points the CLI (`modelworker import-gguf`, `modelworker prepare-demo`) and
library users call. The implementation lives in the `registry.gguf` package."""

from .gguf import (
    DEFAULT_MAX_SHARD_BYTES,
    GgufImportError,
    demo_gguf_path,
    import_gguf,
    import_gguf_detailed,
    is_complete_import,
    main_import,
    main_prepare_demo,
)

__all__ = [
    "DEFAULT_MAX_SHARD_BYTES",
    "GgufImportError",
    "demo_gguf_path",
    "import_gguf",
    "import_gguf_detailed",
    "is_complete_import",
    "main_import",
    "main_prepare_demo",
]
