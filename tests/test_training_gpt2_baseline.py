"""The same-size GPT-2 baseline (`model_type: gpt2`; `llama` alike) trains through training/pretrain_clm.py's loop on the same
blocks as the XL model, reports bits per byte on the same held-out bytes, and saves a checkpoint that loads with
AutoModelForCausalLM."""

import pytest
import torch
from training_utils import TINY_CLM_RUN, cli, train_losses

from training import pretrain_clm
from training.common import load_tokenizer, parse_run_args

TINY_SIZES = {key: value for key, value in TINY_CLM_RUN.items()
              if key in {f"model.{name}" for name in pretrain_clm.BASELINE_FIELDS["gpt2"]}}
TINY_GPT2_RUN = {**{key: value for key, value in TINY_CLM_RUN.items() if not key.startswith("model.")},
                 **TINY_SIZES, "model_type": "gpt2", "segment_length": TINY_CLM_RUN["block_size"]}


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("gpt2")
    summary = pretrain_clm.main(cli({**TINY_GPT2_RUN, "output_dir": output_dir, "max_steps": 10, "eval_every": 10,
                                     "save_every": 10}))
    return output_dir, summary


def test_gpt2_baseline_learns_and_reports_bits_per_byte(gpt2_run):
    output_dir, summary = gpt2_run
    losses = train_losses(output_dir)
    assert len(losses) == 10 and summary["steps"] == 10
    assert losses[-1] < losses[0] - 0.5, losses  # byte-level loss starts near ln(260) = 5.56
    assert 0 < summary["eval"]["bits_per_byte"] < 8
    # the same held-out bytes as the XL run: max_eval_batches=2 blocks of 4 x 128 -> 2 * 4 * 127 predictions
    assert summary["eval"]["tokens"] == 2 * 4 * (TINY_CLM_RUN["block_size"] - 1)


def test_gpt2_checkpoint_loads_with_auto_class_and_matches_training_loss(gpt2_run):
    from transformers import AutoModelForCausalLM, GPT2LMHeadModel

    output_dir, _ = gpt2_run
    model = AutoModelForCausalLM.from_pretrained(output_dir / "final").eval()
    assert isinstance(model, GPT2LMHeadModel)
    config = model.config
    assert (config.n_embd, config.n_layer, config.n_head, config.n_inner, config.activation_function) == (32, 2, 2, 64, "gelu")
    assert (config.vocab_size, config.n_positions, config._attn_implementation) == (260, 128, "sdpa")
    assert (config.resid_pdrop, config.embd_pdrop, config.attn_pdrop) == (0.0, 0.0, 0.0)
    tokenizer = load_tokenizer("byte")
    ids = tokenizer(["The government said on Tuesday that the minister would"], return_tensors="pt",
                    add_special_tokens=False)["input_ids"]
    run_config, _ = parse_run_args(pretrain_clm.CLMRunConfig, cli(TINY_GPT2_RUN))
    with torch.no_grad():
        loss_sum, n_tokens = pretrain_clm.CausalLM(run_config).block_loss(model, ids)
        reference = model(input_ids=ids, labels=ids).loss  # transformers' own shifted loss
    assert n_tokens == ids.shape[1] - 1
    assert float(loss_sum) / n_tokens == pytest.approx(float(reference), rel=1e-5)


def test_gpt2_run_config_validation():
    with pytest.raises(ValueError, match="model_type"):
        parse_run_args(pretrain_clm.CLMRunConfig, ["--model_type", "mamba"])
    with pytest.raises(ValueError, match="segment_length"):
        parse_run_args(pretrain_clm.CLMRunConfig, ["--model_type", "gpt2", "--block_size", "64"])
    with pytest.raises(ValueError, match="patch_size"):
        parse_run_args(pretrain_clm.CLMRunConfig, ["--model_type", "gpt2", "--block_size", "64",
                                                   "--segment_length", "64", "--model.patch_size", "8"])


def test_llama_baseline_trains_through_the_same_loop(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    run = {**TINY_GPT2_RUN, "model_type": "llama", "output_dir": tmp_path, "max_steps": 6, "eval_every": 6,
           "save_every": 6}
    summary = pretrain_clm.main(cli(run))
    losses = train_losses(tmp_path)
    assert losses[-1] < losses[0] - 0.3, losses
    assert summary["eval"]["tokens"] == 2 * 4 * (TINY_CLM_RUN["block_size"] - 1)  # the same held-out bytes
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert isinstance(model, LlamaForCausalLM)
    assert (model.config.hidden_size, model.config.num_hidden_layers, model.config.vocab_size) == (32, 2, 260)
