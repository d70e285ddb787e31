"""Shared test helpers.

`run_without_package` runs Python code in a fresh interpreter in which `import hier_transformers` fails,
the way a user who only has a checkpoint folder (and `trust_remote_code=True`) would run it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

_BLOCK_PACKAGE = '''
import importlib.abc, sys
class _BlockHierTransformers(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "hier_transformers" or name.startswith("hier_transformers."):
            raise ModuleNotFoundError(f"{name} is blocked in this process")
        return None
sys.meta_path.insert(0, _BlockHierTransformers())
try:
    import hier_transformers  # noqa: F401
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("hier_transformers should not be importable here")
'''


def run_without_package(code: str, cwd: str | None = None, env: dict | None = None, timeout: int = 600) -> str:
    """Run `code` in a fresh process that cannot import hier_transformers; return its stdout.

    The process runs offline (HF_HUB_OFFLINE=1). Fails the test with the child's stderr if it exits non-zero.
    """
    child_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    child_env.pop("PYTHONPATH", None)
    script = _BLOCK_PACKAGE + "\n" + textwrap.dedent(code)
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=cwd, env=child_env, capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:
        pytest.fail(f"fresh process failed (rc={result.returncode}):\n{result.stderr[-6000:]}")
    return result.stdout


def last_json_line(stdout: str):
    """The last line of a child's stdout, parsed as JSON (children print their results that way)."""
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
