"""FSDP2 on CPU: the same pretraining script, unchanged, under `accelerate launch --config_file
training/accelerate/cpu_fsdp.yaml` (two gloo ranks). The parameters are DTensor shards, the loss falls, the final
folder holds the gathered weights and loads with from_pretrained, and a resumed run from a checkpoint of the sharded
run ends exactly where the uninterrupted one ends."""

import math
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from training_utils import REPO_ROOT, TINY_MLM_RUN, child_env, cli, run_script, summary, train_losses

ACCELERATE_FSDP = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(REPO_ROOT / "training" / "accelerate" / "cpu_fsdp.yaml"), "--main_process_port", "0"]
RUN = {**TINY_MLM_RUN, "max_steps": 6, "save_every": 3, "eval_every": 6, "learning_rate": 1e-2,
       "max_train_documents": 24, "keep_checkpoints": 2}


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("fsdp") / "run"
    run_script("pretrain_mlm.py", {**RUN, "output_dir": output_dir}, launcher=ACCELERATE_FSDP)
    return output_dir


def test_fsdp_run_shards_parameters_and_learns(fsdp_run):
    result = summary(fsdp_run)
    assert (result["num_processes"], result["distributed_type"], result["parameters_sharded"]) == (2, "FSDP", True)
    losses = train_losses(fsdp_run)
    assert len(losses) == RUN["max_steps"]  # only the main process logs
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.3, losses
    files = {path.name for path in (fsdp_run / "checkpoints" / "step_0000006").iterdir()}
    assert files == {"pytorch_model_fsdp.bin", "optimizer.bin", "scheduler.bin", "random_states_0.pkl",
                     "random_states_1.pkl", "trainer_state.json"}


def test_gathered_final_model_loads_in_one_process(fsdp_run):
    from transformers import AutoModelForMaskedLM

    final = fsdp_run / "final"
    model, info = AutoModelForMaskedLM.from_pretrained(final, trust_remote_code=True, output_loading_info=True)
    assert not any(info.values()), info  # no missing / unexpected / mismatched keys: every shard was gathered
    saved = load_file(final / "model.safetensors")
    loaded = model.state_dict()
    for name, tensor in saved.items():
        assert tensor.shape == loaded[name].shape and torch.equal(loaded[name], tensor), name
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert math.isfinite(summary(fsdp_run)["eval"]["loss"])


def test_resume_from_a_checkpoint_of_the_sharded_run(fsdp_run, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(fsdp_run, resumed)
    shutil.rmtree(resumed / "final")
    shutil.rmtree(resumed / "checkpoints" / "step_0000006")  # back to step 3
    command = [*ACCELERATE_FSDP, str(REPO_ROOT / "training" / "pretrain_mlm.py"),
               *cli({**RUN, "output_dir": resumed}), "--resume"]
    result = subprocess.run(command, cwd=REPO_ROOT, env=child_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "resumed from" in result.stdout + result.stderr and "step_0000003" in result.stdout + result.stderr
    expected, got = summary(fsdp_run), summary(resumed)
    assert got["steps"] == expected["steps"] and got["tokens_seen"] == expected["tokens_seen"]
    assert got["train_loss"] == pytest.approx(expected["train_loss"], abs=1e-5)
    assert got["eval"]["loss"] == pytest.approx(expected["eval"]["loss"], abs=1e-5)
    reference, weights = load_file(fsdp_run / "final" / "model.safetensors"), load_file(resumed / "final" / "model.safetensors")
    for name, tensor in reference.items():
        torch.testing.assert_close(weights[name], tensor, rtol=0, atol=1e-5, msg=name)
