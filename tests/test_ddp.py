"""The same pretraining script, unchanged, as a real two-rank gloo DDP run on CPU (`accelerate launch --multi_gpu
--num_processes 2`): both ranks train together and the run produces the same kind of checkpoint as one process."""

import json
import sys

from training_utils import TINY_CLM_RUN, run_script, summary, train_losses

ACCELERATE_DDP = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]


def test_two_process_ddp_clm_run(tmp_path):
    from transformers import AutoModelForCausalLM

    run_script("pretrain_clm.py", {**TINY_CLM_RUN, "output_dir": tmp_path, "save_every": 4}, launcher=ACCELERATE_DDP)
    result = summary(tmp_path)
    assert result["num_processes"] == 2
    losses = train_losses(tmp_path)
    assert len(losses) == TINY_CLM_RUN["max_steps"]  # one log line per step: only the main process logs
    assert losses[-1] < losses[0] - 0.3, losses
    # each step consumed one batch per rank: twice the tokens of a one-process step
    rows = TINY_CLM_RUN["per_device_batch_size"] * TINY_CLM_RUN["block_size"]
    assert result["tokens_seen"] == 2 * rows * TINY_CLM_RUN["max_steps"]
    for step in ("step_0000004", "step_0000008"):
        files = {path.name for path in (tmp_path / "checkpoints" / step).iterdir()}
        assert files == {"model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl",
                         "random_states_1.pkl", "trainer_state.json",
                         # the stream trainer's carried memory: each rank saves its own rows
                         "stream_memory_rank0.safetensors", "stream_memory_rank1.safetensors"}
    final = tmp_path / "final"
    assert json.loads((final / "config.json").read_text())["architectures"] == ["HierarchicalXLForCausalLM"]
    model = AutoModelForCausalLM.from_pretrained(final, trust_remote_code=True)
    assert type(model).__name__ == "HierarchicalXLForCausalLM"
