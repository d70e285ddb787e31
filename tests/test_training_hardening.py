"""What a user gets from the training commands for the inputs that used to lose data or train the wrong thing:
an output_dir that already holds a run, --resume on a finished / damaged / missing run, a multi-process launch that
did not become distributed, mistyped run-config values, and one plain text file as the whole corpus. Every run goes
through the command a user types (`python training/pretrain_mlm.py --key value ...`, the shared `common.train`)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import pytest
from training_utils import REPO_ROOT, TINY_MLM_RUN, child_env, cli, summary, train_losses

from training.common import read_metrics

RUN = {**TINY_MLM_RUN, "max_steps": 4, "save_every": 2, "eval_every": 4, "max_train_documents": 16}


def mlm(options: dict, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python training/pretrain_mlm.py ...`; the result whatever its exit status."""
    command = [sys.executable, str(REPO_ROOT / "training" / "pretrain_mlm.py"), *cli(options)]
    return subprocess.run(command, cwd=REPO_ROOT, env=env or child_env(), capture_output=True, text=True, timeout=300)


def succeeded(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4; tests work on copies."""
    output_dir = tmp_path_factory.mktemp("finished") / "run"
    succeeded(mlm({**RUN, "output_dir": output_dir}))
    return output_dir


@pytest.fixture
def run_copy(finished_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def test_output_dir_holding_a_run_is_refused_and_overwrite_starts_clean(run_copy):
    final_weights = (run_copy / "final" / "model.safetensors").read_bytes()
    refused = mlm({**RUN, "output_dir": run_copy, "max_steps": 2, "save_every": 1, "eval_every": 2})
    assert refused.returncode != 0
    assert "already holds a run" in refused.stderr and "--overwrite_output_dir true" in refused.stderr
    assert (run_copy / "final" / "model.safetensors").read_bytes() == final_weights  # nothing touched
    assert len(train_losses(run_copy)) == RUN["max_steps"]

    succeeded(mlm({**RUN, "output_dir": run_copy, "max_steps": 2, "save_every": 1, "eval_every": 2,
                   "overwrite_output_dir": "true"}))
    # only the new run is left: its two checkpoints, its log lines, its final model
    assert sorted(path.name for path in (run_copy / "checkpoints").iterdir()) == ["step_0000001", "step_0000002"]
    assert [record["step"] for record in read_metrics(run_copy / "logs" / "metrics.jsonl")
            if "train/loss" in record] == [1, 2]
    assert summary(run_copy)["steps"] == 2


def test_resume_of_a_finished_run_changes_nothing(run_copy):
    before = {path: path.read_bytes() for path in run_copy.rglob("*") if path.is_file()}
    result = succeeded(mlm_resume(run_copy))
    assert "already finished" in result.stdout
    after = {path: path.read_bytes() for path in run_copy.rglob("*") if path.is_file()}
    assert after == before  # the summary keeps its metrics, the card its results
    assert math.isfinite(summary(run_copy)["train_loss"])


def mlm_resume(output_dir, **overrides) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO_ROOT / "training" / "pretrain_mlm.py"),
               *cli({**RUN, "output_dir": output_dir, **overrides}), "--resume"]
    return subprocess.run(command, cwd=REPO_ROOT, env=child_env(), capture_output=True, text=True, timeout=300)


def test_resume_skips_a_checkpoint_without_weights_and_says_which_it_used(run_copy):
    (run_copy / "checkpoints" / "step_0000004" / "model.safetensors").unlink()
    shutil.rmtree(run_copy / "final")
    result = succeeded(mlm_resume(run_copy))
    output = result.stdout + result.stderr
    assert "skipping incomplete checkpoint" in output and "step_0000004" in output
    assert f"resumed from {run_copy / 'checkpoints' / 'step_0000002'}" in output
    assert summary(run_copy)["steps"] == RUN["max_steps"]


def test_failed_resume_leaves_the_run_config_alone(run_copy):
    run_config = (run_copy / "logs" / "run_config.json").read_bytes()
    shutil.rmtree(run_copy / "final")
    failed = mlm_resume(run_copy, **{"model.hidden_size": 64})  # weights of another shape
    assert failed.returncode != 0
    assert (run_copy / "logs" / "run_config.json").read_bytes() == run_config


def test_resume_without_a_run_is_a_named_error(tmp_path):
    failed = mlm_resume(tmp_path / "nothing-here")
    assert failed.returncode != 0 and "holds no run to resume" in failed.stderr
    assert not (tmp_path / "nothing-here" / "logs" / "run_config.json").exists()


def test_multi_process_launch_that_did_not_become_distributed_is_refused(tmp_path):
    # one of two launched processes (LOCAL_WORLD_SIZE=2) that accelerate set up as a single-process run
    failed = mlm({**RUN, "output_dir": tmp_path / "run"}, env=child_env(LOCAL_WORLD_SIZE="2"))
    assert failed.returncode != 0
    assert "single-process run" in failed.stderr and "unsynchronised" in failed.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("option, value, message", [
    ("learning_rate", "true", "learning_rate must be a number, got True (bool)"),
    ("max_steps", "ten", "max_steps must be an integer, got 'ten'"),
    ("model", "{hidden_size:32}", "Write a space after each colon"),
])
def test_mistyped_values_are_named_errors(tmp_path, option, value, message):
    failed = mlm({**RUN, "output_dir": tmp_path / "run", option: value})
    assert failed.returncode != 0 and message in failed.stderr
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def book(tmp_path_factory):
    """One plain text file of real prose, one paragraph per line (~40 news articles)."""
    from hier_transformers.data import load_news_articles

    texts = load_news_articles()["validation"]["text"][:40]
    path = tmp_path_factory.mktemp("book") / "book.txt"
    path.write_text("\n".join(paragraph for text in texts for paragraph in text.split("\n\n")) + "\n")
    return path


def test_one_text_file_trains_with_a_validation_split_by_bytes(book, tmp_path):
    # one training document (the MLM keeps its first max_length tokens): one row per batch
    result = succeeded(mlm({**RUN, "output_dir": tmp_path, "data_files": f"[{book}]", "max_train_documents": "null",
                            "per_device_batch_size": 1}))
    assert "too few for a validation split by documents" in result.stdout
    assert "cut at a line boundary" in result.stdout
    run = summary(tmp_path)
    assert (run["train_documents"], run["validation_documents"]) == (1, 1) and run["steps"] == RUN["max_steps"]
    assert run["eval"]["tokens"] > 0


def test_one_text_file_split_into_documents_by_line(book, tmp_path):
    lines = [line for line in book.read_text().splitlines() if line.strip()]
    # `--data_files book.txt`, a bare path as a user types it, is a list of one
    succeeded(mlm({**RUN, "output_dir": tmp_path, "data_files": str(book), "document_separator": "line",
                   "max_train_documents": "null", "max_eval_documents": "null"}))
    run = summary(tmp_path)
    assert run["train_documents"] + run["validation_documents"] == len(lines)
    assert run["validation_documents"] == -(-len(lines) * 5 // 100)  # validation_fraction 0.05 of the documents


def test_too_little_text_is_a_named_error(tmp_path):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("hi")
    failed = mlm({**RUN, "output_dir": tmp_path / "run", "data_files": f"[{tiny}]"})
    assert failed.returncode != 0 and "too little for a training and a validation split" in failed.stderr


def test_model_card_lists_every_hierarchy_field(tmp_path):
    from training_utils import TINY_ENCODER_CONFIG, TINY_XL_CONFIG

    from hier_transformers import HierarchicalConfig, HierarchicalXLConfig
    from model_cards.generate_card import build_card

    for config in (HierarchicalConfig(**TINY_ENCODER_CONFIG), HierarchicalXLConfig(**TINY_XL_CONFIG)):
        folder = tmp_path / config.model_type
        config.save_pretrained(folder)
        (folder / "run_summary.json").write_text(json.dumps({
            "task": "masked-lm" if config.model_type == "hierarchical" else "causal-lm", "model_name": "tiny",
            "dataset": {"type": "local-files", "name": "local files"}, "eval": {"loss": 1.0}}))
        card = build_card(folder).content
        hierarchy = ("section_position_type", "section_rope_theta", "top_down", "summary_type", "hierarchy_layout") \
            if config.model_type == "hierarchical" else ("rope_theta", "local_window", "max_section_summaries")
        for name in hierarchy:
            assert f"| `{name}` |" in card, name
