"""training/pretrain_clm.py in one process: it trains, logs, checkpoints, and saves a model that loads with the Auto
classes, carries its model card, and generates through training/generate.py."""

import json

import pytest
import torch
import yaml
from huggingface_hub import ModelCard, ModelCardData
from training_utils import TINY_CLM_RUN, cli, train_losses

from training import pretrain_clm
from training.common import RunConfig, parse_run_args
from training.generate import generate

CHECKPOINT_FILES = {"model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl", "trainer_state.json",
                    "stream_memory_rank0.safetensors"}  # the stream trainer's carried memory


@pytest.fixture(scope="module")
def clm_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("clm")
    summary = pretrain_clm.main(cli({**TINY_CLM_RUN, "output_dir": output_dir, "max_steps": 10, "save_every": 5,
                                     "eval_every": 5}))
    return output_dir, summary


def test_clm_loss_falls_and_is_logged(clm_run):
    output_dir, summary = clm_run
    losses = train_losses(output_dir)
    assert len(losses) == 10
    assert losses[-1] < losses[0] - 0.5, losses  # byte-level loss starts near ln(260) = 5.56
    assert summary["steps"] == 10 and summary["num_processes"] == 1
    assert 0 < summary["eval"]["bits_per_byte"] < 8
    assert summary["eval"]["bits_per_byte"] == pytest.approx(summary["eval"]["loss"] / 0.6931471805599453, rel=0.1)
    assert list((output_dir / "logs").rglob("events.out.tfevents.*")) == []  # trackers: [jsonl] only


def test_clm_checkpoints_are_safetensors_and_pruned(clm_run):
    output_dir, _ = clm_run
    checkpoints = sorted((output_dir / "checkpoints").iterdir())
    assert [path.name for path in checkpoints] == ["step_0000005", "step_0000010"]
    for path in checkpoints:
        assert {file.name for file in path.iterdir()} == CHECKPOINT_FILES
        assert json.loads((path / "trainer_state.json").read_text())["step"] == int(path.name.split("_")[1])


def test_clm_final_model_loads_with_auto_classes_and_generates(clm_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = clm_run[0] / "final"
    names = {path.name for path in final.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "README.md", "tokenizer_config.json",
            "modeling_hierarchical_xl.py", "modeling_blocks.py"} <= names
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in names)
    config = json.loads((final / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_hierarchical_xl.HierarchicalXLForCausalLM"
    model = AutoModelForCausalLM.from_pretrained(final, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(final, trust_remote_code=True)
    text = generate(model, tokenizer, "The government", max_new_tokens=40, greedy=True, stream=False)
    again = generate(model, tokenizer, "The government", max_new_tokens=40, greedy=True, stream=False)
    assert isinstance(text, str) and text == again
    ids = tokenizer("The government", return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=40, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 40 or tokenizer.eos_token_id in generated[0, ids.shape[1]:]


def test_clm_model_card_metadata_round_trips(clm_run):
    output_dir, summary = clm_run
    card = ModelCard.load(output_dir / "final" / "README.md")
    metadata = yaml.safe_load(card.content.split("---")[1])
    assert ModelCardData(**metadata).to_dict() == card.data.to_dict()
    assert card.data.pipeline_tag == "text-generation"
    results = {result.metric_type: result.metric_value for result in card.data.eval_results}
    assert results["bits_per_byte"] == pytest.approx(summary["eval"]["bits_per_byte"], abs=1e-5)
    assert "| `patch_size` | 8 |" in card.text and "| `local_window` | 16 |" in card.text


def test_run_config_overrides_and_validation(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("max_steps: 5\nwarmup_steps: 1\nmodel:\n  hidden_size: 64\n")
    config, resume = parse_run_args(RunConfig, ["--config", str(config_file), "--model.hidden_size", "32",
                                                "--trackers", "[jsonl]", "--resume"])
    assert (config.max_steps, config.model, config.trackers, resume) == (5, {"hidden_size": 32}, ["jsonl"], True)
    with pytest.raises(ValueError, match="warmup_steps"):
        parse_run_args(RunConfig, ["--max_steps", "5", "--warmup_steps", "10"])
    with pytest.raises(ValueError, match="unknown run-config field"):
        parse_run_args(RunConfig, ["--max_step", "5"])
    with pytest.raises(ValueError, match="segment_length"):
        parse_run_args(pretrain_clm.CLMRunConfig, ["--block_size", "64", "--segment_length", "128"])


def test_final_evaluation_scores_whole_held_out_documents_beside_compressors(clm_run):
    output_dir, summary = clm_run
    final = summary["final_eval"]
    assert final["documents"] == TINY_CLM_RUN["max_eval_documents"]
    assert 0 < final["bits_per_byte"] < 8.5 and 0 < final["bzip2_-9"] < 8 and 0 < final["concatenated"]["xz_-9e"] < 8
    assert sum(bucket["bytes"] for bucket in final["by_position"].values()) == final["bytes"]  # every byte scored
    saved = json.loads((output_dir / "final" / "run_summary.json").read_text())
    assert saved["final_eval"]["bits_per_byte"] == pytest.approx(final["bits_per_byte"])
    assert "memory carried from each document's start" in (output_dir / "final" / "README.md").read_text()


def test_init_from_loads_safetensors_weights_and_refuses_a_model_they_do_not_fit(tmp_path):
    """`init_from` (a curriculum's second stage): a checkpoint's model.safetensors, or a folder holding one, starts
    the run with exactly those weights; weights that do not fit are refused, naming the field; weights the model
    initialises at 0 to start as the model without them (`key_shift`, gated retrieval's gate) may be missing."""
    import torch
    from safetensors.torch import save_file

    from hier_transformers import HierarchicalXLConfig, HierarchicalXLForCausalLM
    from training.common import load_initial_weights

    def model(**overrides):
        sizes = dict(vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
        return HierarchicalXLForCausalLM(HierarchicalXLConfig(**(sizes | overrides)))

    torch.manual_seed(0)
    trained = model()
    state = {name: tensor for name, tensor in trained.state_dict().items() if name != "lm_head.weight"}
    save_file(state, tmp_path / "model.safetensors")
    for source in (tmp_path / "model.safetensors", tmp_path):
        torch.manual_seed(1)
        fresh = model()
        load_initial_weights(fresh, str(source))
        for name, tensor in trained.state_dict().items():
            assert torch.equal(fresh.state_dict()[name], tensor), name
    with pytest.raises(ValueError, match="init_from .* does not fit"):
        load_initial_weights(model(num_hidden_layers=2), str(tmp_path))
    shifted = model(key_shift=True)  # a weight initialised at 0 ("starts as the model without it") may be missing
    load_initial_weights(shifted, str(tmp_path))
    assert all(layer.self_attn.key_shift.abs().max() == 0 for layer in shifted.model.layers)
    input_ids = torch.randint(4, 40, (1, 30))
    with torch.no_grad():
        torch.testing.assert_close(shifted.eval()(input_ids).logits, trained.eval()(input_ids).logits)
    with pytest.raises(ValueError, match="init_from must be a .safetensors file"):
        load_initial_weights(model(), str(tmp_path / "missing.bin"))
