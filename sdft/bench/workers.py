"""Fresh Python processes for measurements that need their own process (peak memory, one model each): the
command that calls a function of sdft in a new interpreter, and an environment in which this copy of sdft
is the one imported and no model hub is contacted."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import sdft

SDFT_ROOT = str(Path(sdft.__file__).resolve().parents[1])


def python_call(module: str, function: str, *args: str) -> list[str]:
    """argv that runs `module.function()` in a new interpreter; the function reads `args` from sys.argv[1:]."""
    return [sys.executable, "-c", f"import sys; from {module} import {function}; sys.exit({function}())", *args]


def worker_env() -> dict[str, str]:
    """This process's environment with this copy of sdft first on PYTHONPATH, and the hubs offline."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": SDFT_ROOT + (os.pathsep + path if path else ""), "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
