"""Shared plumbing for the benchmarks.

Every measurement (one model at one length) runs in a fresh Python process (`run_case`), so that one
model's allocations, caches or a crash never leak into another's numbers, and a case that runs past
its time cap is killed and reported as ``timeout`` instead of stalling the whole run.

Peak memory:
- CPU: the growth of the process' resident set over a block. The kernel's high-water mark (``VmHWM``)
  is reset through ``/proc/self/clear_refs`` at the start of the block, so the peak is measured from the
  state after model creation (weights and inputs excluded). Workers run with a fixed glibc
  ``MALLOC_MMAP_THRESHOLD_`` so that freed tensors go back to the OS instead of staying in the heap
  (otherwise a second block would reuse the first one's memory and look cheaper than it is). Where
  ``clear_refs`` is not writable, ``ru_maxrss`` minus the baseline is used (only exact for the first block).
- CUDA: ``torch.cuda.max_memory_allocated`` minus the memory allocated at the start of the block.
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------------------
# worker side: timing and memory
# ----------------------------------------------------------------------------------------------------


def _proc_status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", text).group(1))


def _reset_cpu_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Context manager: peak memory growth in bytes over the block (`.bytes`), see the module docstring."""

    def __init__(self, device: str):
        self.device = device
        self.bytes = 0
        self.method = ""

    def __enter__(self) -> "PeakMemory":
        import gc

        import torch

        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            self.method = "cuda.max_memory_allocated"
        elif _reset_cpu_peak():
            self._base = _proc_status_kib("VmRSS") * 1024
            self.method = "VmHWM-VmRSS (clear_refs)"
        else:
            self._base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.method = "ru_maxrss delta"
        return self

    def __exit__(self, *exc) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        elif self.method.startswith("VmHWM"):
            peak = _proc_status_kib("VmHWM") * 1024
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.bytes = max(0, peak - self._base)


def import_ours(module: str, *names: str) -> tuple:
    """`from hier_transformers.<module> import <names>`, also where `import hier_transformers` fails.

    The package's `__init__` also imports its data helpers (and so `datasets`); a GPU machine without them can
    still load the model files, which only import each other: they are then loaded under a bare package module.
    """
    import importlib
    import types

    try:
        importlib.import_module("hier_transformers")
    except ImportError as error:
        if getattr(error, "name", "") and error.name.startswith("hier_transformers"):
            raise
        print(f"note: `import hier_transformers` failed ({error}); loading its model files directly", file=sys.stderr)
        for key in [key for key in sys.modules if key == "hier_transformers" or key.startswith("hier_transformers.")]:
            del sys.modules[key]
        package = types.ModuleType("hier_transformers")
        package.__path__ = [str(REPO_ROOT / "hier_transformers")]
        sys.modules["hier_transformers"] = package
    loaded = importlib.import_module(f"hier_transformers.{module}")
    return tuple(getattr(loaded, name) for name in names)


def synchronize(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def time_calls(fn: Callable[[], object], device: str, warmup: int, repeats: int, budget_s: float) -> dict:
    """Run `fn` `warmup` times untimed, then up to `repeats` timed calls within `budget_s` seconds.

    A call slower than the whole budget is measured once: if the warm-up alone used up the budget, its
    own time is the measurement and ``warmup_only`` says so.
    """
    warm_times = []
    for _ in range(warmup):
        start = time.perf_counter()
        fn()
        synchronize(device)
        warm_times.append(time.perf_counter() - start)
        if warm_times[-1] > budget_s:
            return {"median_s": warm_times[-1], "times_s": warm_times[-1:], "warmup_only": True}
    times = []
    begin = time.perf_counter()
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
        if time.perf_counter() - begin > budget_s:
            break
    return {"median_s": statistics.median(times), "times_s": times, "warmup_only": False}


def is_out_of_memory(error: BaseException) -> bool:
    text = f"{type(error).__name__}: {error}".lower()
    return "out of memory" in text or "outofmemory" in text or "can't allocate memory" in text or isinstance(
        error, MemoryError
    )


def setup_torch(device: str, threads: int, seed: int = 0) -> None:
    import torch

    if device == "cpu" and threads > 0:
        torch.set_num_threads(threads)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(seed)


def torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def emit(record: dict) -> None:
    """The worker's answer: one JSON line on stdout (the parent reads the last one)."""
    print(json.dumps(record), flush=True)


# ----------------------------------------------------------------------------------------------------
# parent side: running cases in fresh processes
# ----------------------------------------------------------------------------------------------------


def _limit_address_space(max_gb: float) -> Callable[[], None] | None:
    if max_gb <= 0:
        return None

    def apply() -> None:
        limit = int(max_gb * 1024**3)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return apply


def run_case(script: Path, spec: dict, timeout_s: float, max_memory_gb: float = 0.0) -> list[dict]:
    """Run `script --worker <spec>` in a fresh interpreter and return one record per (length, mode).

    The worker prints one JSON line per finished measurement, so a process killed half-way keeps what it
    finished; every (length, mode) of the spec without a line gets a failure record whose ``status`` is
    ``timeout`` (killed at `timeout_s`), ``oom`` (allocation failed, the CPU address-space cap
    `max_memory_gb` included, or killed by the kernel) or ``error``.
    """
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    command = [sys.executable, str(script), "--worker", json.dumps(spec)]
    # The address-space cap only makes sense on CPU: CUDA reserves large virtual ranges.
    preexec = _limit_address_space(max_memory_gb) if spec["device"] == "cpu" else None
    failure = {"status": "error", "detail": "the worker printed no record"}
    try:
        proc = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout_s, env=env, preexec_fn=preexec
        )
        stdout, stderr = proc.stdout, proc.stderr
        if proc.returncode != 0:
            tail = (stderr.strip().splitlines() or ["(no output)"])[-1][:300]
            oom = proc.returncode in (-9, 137) or "out of memory" in stderr.lower() or "can't allocate" in stderr
            failure = {"status": "oom" if oom else "error", "detail": tail}
    except subprocess.TimeoutExpired as expired:
        stdout = expired.stdout.decode() if isinstance(expired.stdout, bytes) else (expired.stdout or "")
        failure = {"status": "timeout", "detail": f"process killed after {timeout_s:.0f}s"}
    records = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    done = {(record["length"], record["mode"]) for record in records}
    base = {key: spec[key] for key in ("model", "device", "dtype")}
    for length in spec["lengths"]:
        for mode in spec["modes"]:
            if (length, mode) not in done:
                records.append({**base, "length": length, "mode": mode, **failure})
    return records


def skip_record(base: dict, length: int, mode: str, reason: dict) -> dict:
    """The record of a length not attempted because a shorter one already failed (worker side)."""
    return {**base, "length": length, "mode": mode, "status": reason["status"],
            "detail": f"not attempted: {reason['status']} at {reason['length']} tokens"}


def run_all_cases(script: Path, common: dict, models: Sequence[str], lengths: Sequence[int], args,
                  report: Callable[[list[dict]], object], desc: str) -> list[dict]:
    """Measure every (model, length) for `common["modes"]`, one process per case (``args.group == "case"``,
    exact CPU memory) or per model (``"model"``: saves the start-up of a process per case on CUDA).

    After a timeout or OOM at one length, a model's longer lengths are reported as not attempted. `report`
    is called with all records after every process, so a run stopped half-way leaves valid reports.
    """
    from tqdm import tqdm

    lengths = sorted(lengths)
    if args.group == "model":
        batches = [(model, lengths) for model in models]
    else:
        batches = [(model, [length]) for length in lengths for model in models]
    records: list[dict] = []
    failed: dict[str, dict] = {}
    progress = tqdm(batches, desc=desc, unit="process")
    for model, batch in progress:
        base = {"model": model, "device": common["device"], "dtype": common["dtype"]}
        if model in failed:
            records += [skip_record(base, length, mode, failed[model]) for length in batch for mode in common["modes"]]
            continue
        progress.set_postfix_str(f"{model} {','.join(format_length(length) for length in batch)}")
        spec = {**common, "model": model, "lengths": batch}
        new = run_case(script, spec, args.case_timeout * len(batch), args.max_memory_gb)
        records += new
        for record in new:
            if record["status"] in ("oom", "timeout") and model not in failed:
                failed[model] = {"status": record["status"], "length": record["length"]}
        report(records)
    return records


# ----------------------------------------------------------------------------------------------------
# reporting
# ----------------------------------------------------------------------------------------------------


def loglog_slope(points: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares slope of log(y) against log(x); None with fewer than two usable points."""
    usable = [(math.log(x), math.log(y)) for x, y in points if x > 0 and y and y > 0]
    if len(usable) < 2:
        return None
    mean_x = sum(x for x, _ in usable) / len(usable)
    mean_y = sum(y for _, y in usable) / len(usable)
    var = sum((x - mean_x) ** 2 for x, _ in usable)
    return sum((x - mean_x) * (y - mean_y) for x, y in usable) / var


def format_seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"


def format_bytes(value: float | None) -> str:
    if value is None:
        return "-"
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value:.0f} B"


def format_length(tokens: int) -> str:
    return f"{tokens // 1024}k" if tokens % 1024 == 0 else str(tokens)


def cell(record: dict | None, key: str, formatter: Callable[[float | None], str]) -> str:
    """A table cell: the formatted value, or the reason there is none (timeout, oom, error, not run)."""
    if record is None:
        return "not run"
    if record.get("status") != "ok":
        return record.get("status", "error")
    text = formatter(record.get(key))
    return text + ("*" if key == "median_s" and record.get("warmup_only") else "")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def environment_info(device: str) -> dict:
    import platform

    import torch
    import transformers

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def loglog_plot(path: Path, panels: Sequence[dict], title: str) -> None:
    """panels: [{"title", "ylabel", "series": {label: [(x, y), ...]}}] -> a grid of log-log subplots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 2 if len(panels) == 4 else len(panels)
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.5 * columns, 4.2 * rows), squeeze=False)
    for axis, panel in zip(axes.flat, panels):
        for label, points in panel["series"].items():
            points = [(x, y) for x, y in points if y is not None and y > 0]
            if points:
                xs, ys = zip(*sorted(points))
                style = {"linewidth": 2.5, "color": "black"} if label.startswith("hier") else {}
                axis.plot(xs, ys, marker="o", label=label, **style)
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_title(panel["title"])
        axis.set_xlabel(panel.get("xlabel", "tokens"))
        axis.set_ylabel(panel["ylabel"])
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
