"""A pretraining run killed with SIGKILL after a checkpoint and resumed with --resume ends exactly where the
uninterrupted run ends: same data order, RNG (dropout), optimizer and scheduler state."""

import json
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file
from training_utils import REPO_ROOT, TINY_CLM_RUN, child_env, cli, run_script, summary, train_losses

RUN = {**TINY_CLM_RUN, "max_steps": 24, "save_every": 3, "eval_every": 12, "model.attention_dropout": 0.1,
       "keep_checkpoints": 3}


def test_killed_and_resumed_run_matches_uninterrupted(tmp_path):
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    run_script("pretrain_clm.py", {**RUN, "output_dir": reference})

    command = [sys.executable, str(REPO_ROOT / "training" / "pretrain_clm.py"), *cli({**RUN, "output_dir": interrupted})]
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=child_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    marker = interrupted / "checkpoints" / "step_0000006" / "trainer_state.json"
    deadline = time.monotonic() + 240
    try:
        while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert marker.exists() and not (interrupted / "final").exists()
    killed_at = max(json.loads(path.read_text())["step"]
                    for path in (interrupted / "checkpoints").glob("*/trainer_state.json"))
    assert 6 <= killed_at < RUN["max_steps"]

    resumed = subprocess.run([*command, "--resume"], cwd=REPO_ROOT, env=child_env(), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from" in resumed.stdout + resumed.stderr

    expected, got = summary(reference), summary(interrupted)
    assert got["steps"] == expected["steps"] == RUN["max_steps"]
    assert got["tokens_seen"] == expected["tokens_seen"]
    assert abs(got["train_loss"] - expected["train_loss"]) < 1e-6
    assert abs(got["eval"]["loss"] - expected["eval"]["loss"]) < 1e-6
    # the logged curve after the resume point retraces the reference
    assert train_losses(interrupted)[-1] == train_losses(reference)[-1]
    reference_weights = load_file(reference / "final" / "model.safetensors")
    resumed_weights = load_file(interrupted / "final" / "model.safetensors")
    assert reference_weights.keys() == resumed_weights.keys()
    for name, tensor in reference_weights.items():
        torch.testing.assert_close(resumed_weights[name], tensor, rtol=0, atol=1e-6, msg=name)
