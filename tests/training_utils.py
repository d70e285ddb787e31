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

# Model-config keyword arguments of tiny models, for tests that build models directly
# (`HierarchicalXLConfig(**TINY_XL_CONFIG)`, `HierarchicalConfig(**(TINY_ENCODER_CONFIG | {"patch_size": 8}))`).
TINY_XL_CONFIG = {
    "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
    "patch_size": 4, "local_window": 6, "max_patch_summaries": 3, "section_size": 2, "max_section_summaries": 2,
}
TINY_ENCODER_CONFIG = {
    "vocab_size": 50, "hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4, "intermediate_size": 64,
    "max_position_embeddings": 5, "patch_size": 4, "section_size": 2, "hidden_dropout_prob": 0.0,
    "attention_dropout": 0.0,
}


def model_options(fields: dict) -> dict:
    """Model-config fields -> run-config overrides: {"hidden_size": 32} -> {"model.hidden_size": 32}."""
    return {f"model.{key}": value for key, value in fields.items()}


# Training runs through the command line (values as a user types them): a few dozen real documents, tiny models.
TINY_XL = model_options({
    "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64, "patch_size": 8,
    "local_window": 16, "max_patch_summaries": 8, "section_size": 4, "max_section_summaries": 4,
})
TINY_CLM_RUN = {
    **TINY_XL, "block_size": 128, "segment_length": 32, "per_device_batch_size": 4, "max_steps": 8,
    "warmup_steps": 1, "learning_rate": 3e-3, "max_train_documents": 40, "max_eval_documents": 8,
    "max_eval_batches": 2, "trackers": "[jsonl]", "log_every": 1, "eval_every": 8, "save_every": 8,
}
# the same-size GPT-2 baseline: the size fields of TINY_XL only, one block per call
TINY_GPT2_RUN = {
    **{key: value for key, value in TINY_CLM_RUN.items() if not key.startswith("model.")},
    **{key: TINY_XL[key] for key in ("model.hidden_size", "model.num_hidden_layers", "model.num_attention_heads",
                                     "model.intermediate_size")},
    "model_type": "gpt2", "segment_length": TINY_CLM_RUN["block_size"],
}
TINY_MLM_RUN = {
    **model_options({"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                     "patch_size": 16, "section_size": 2, "max_position_embeddings": 32}),
    "max_length": 128, "per_device_batch_size": 4, "max_steps": 8,
    "warmup_steps": 1, "learning_rate": 3e-3, "max_train_documents": 32, "max_eval_documents": 8,
    "max_eval_batches": 2, "trackers": "[jsonl]", "log_every": 1, "eval_every": 8, "save_every": 8,
}
# fine-tuning on a tiny model from scratch (the MiniLM WordPiece tokenizer, no warm start)
TINY_FINETUNE_RUN = {
    "init": "scratch", "tokenizer": "minilm",
    **model_options({"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
                     "patch_size": 16, "section_size": 2, "max_position_embeddings": 17}),
    "max_steps": 2, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 8, "learning_rate": 1e-3,
    "eval_strategy": "no", "report_to": "[]", "logging_steps": 1,
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
