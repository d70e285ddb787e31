"""Tiny run configurations and launch helpers shared by the training tests (test_training_*, test_resume, test_ddp,
test_hub, test_finetune). Runs use the real embedded data (a few dozen documents) and tiny models: plumbing tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

TINY_XL = {
    "model.hidden_size": 32, "model.num_hidden_layers": 2, "model.num_attention_heads": 2,
    "model.intermediate_size": 64, "model.patch_size": 8, "model.local_window": 16, "model.max_patch_summaries": 8,
    "model.section_size": 4, "model.max_section_summaries": 4,
}
TINY_CLM_RUN = {
    **TINY_XL, "block_size": 128, "segment_length": 32, "per_device_batch_size": 4, "max_steps": 8,
    "warmup_steps": 1, "learning_rate": 3e-3, "max_train_documents": 40, "max_eval_documents": 8,
    "max_eval_batches": 2, "trackers": "[jsonl]", "log_every": 1, "eval_every": 8, "save_every": 8,
}
TINY_MLM_RUN = {
    "model.hidden_size": 32, "model.num_hidden_layers": 2, "model.num_attention_heads": 2,
    "model.intermediate_size": 64, "model.patch_size": 16, "model.section_size": 2,
    "model.max_position_embeddings": 32, "max_length": 128, "per_device_batch_size": 4, "max_steps": 8,
    "warmup_steps": 1, "learning_rate": 3e-3, "max_train_documents": 32, "max_eval_documents": 8,
    "max_eval_batches": 2, "trackers": "[jsonl]", "log_every": 1, "eval_every": 8, "save_every": 8,
}


def cli(options: dict) -> list[str]:
    """{"max_steps": 8} -> ["--max_steps", "8"]."""
    return [item for key, value in options.items() for item in (f"--{key}", str(value))]


def child_env(**extra: str) -> dict[str, str]:
    """Environment of a training child process: one thread, quiet, offline unless told otherwise."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONPATH": str(REPO_ROOT), **extra}
    return env


def run_script(script: str, options: dict, env: dict | None = None, launcher: list[str] | None = None,
               timeout: int = 300) -> subprocess.CompletedProcess:
    """Run training/<script> in a child process (optionally under a launcher such as accelerate launch)."""
    command = [*(launcher or [sys.executable]), str(REPO_ROOT / "training" / script), *cli(options)]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env or child_env(), capture_output=True, text=True,
                            timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed (rc={result.returncode}):\n{result.stderr[-6000:]}")
    return result


def train_losses(output_dir: Path) -> list[float]:
    """The train/loss values a run logged through its JSON-lines tracker, in step order."""
    lines = (Path(output_dir) / "logs" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    return [record["train/loss"] for record in records if "train/loss" in record]


def summary(output_dir: Path) -> dict:
    return json.loads((Path(output_dir) / "final" / "run_summary.json").read_text())
