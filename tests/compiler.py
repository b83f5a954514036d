"""Whether this host can run torch.compile's CPU backend (inductor builds C++ with the host's
compiler against Python's headers); the compile_decode tests skip where it cannot."""

from __future__ import annotations

import os
import shutil
import sysconfig
from pathlib import Path


def can_compile() -> bool:
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    return compiler is not None and headers.is_file()
