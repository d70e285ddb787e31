"""training/pretrain_mlm.py: masking respects padding and special tokens, and a tiny MLM run on real news trains
and saves a model that loads with AutoModelForMaskedLM."""

import pytest
import torch
from training_utils import TINY_MLM_RUN, cli, train_losses

from training import pretrain_mlm


def test_mask_tokens_never_selects_padding_or_special_tokens():
    input_ids = torch.tensor([[101, 7, 8, 9, 102, 0, 0, 0]] * 64)
    attention_mask = (input_ids != 0).long()
    masked, labels = pretrain_mlm.mask_tokens(input_ids, attention_mask, special_ids=[0, 101, 102], mask_token_id=103,
                                              vocab_size=200, probability=0.5, generator=torch.Generator().manual_seed(0))
    selected = labels != -100
    assert not selected[:, [0, 4, 5, 6, 7]].any()
    assert torch.equal(masked[:, [0, 4, 5, 6, 7]], input_ids[:, [0, 4, 5, 6, 7]])
    assert 0.35 < selected[:, 1:4].float().mean() < 0.65
    assert torch.equal(labels[selected], input_ids[selected])
    assert (masked[selected] == 103).float().mean() > 0.6  # ~80% [MASK]
    again, _ = pretrain_mlm.mask_tokens(input_ids, attention_mask, [0, 101, 102], 103, 200, 0.5,
                                        torch.Generator().manual_seed(0))
    assert torch.equal(again, masked)  # a function of the seed only


def test_mlm_run_trains_and_saves(tmp_path):
    from transformers import AutoModelForMaskedLM

    result = pretrain_mlm.main(cli({**TINY_MLM_RUN, "output_dir": tmp_path, "learning_rate": 1e-2, "max_steps": 16,
                                      "eval_every": 16, "save_every": 16}))
    losses = train_losses(tmp_path)
    assert len(losses) == 16
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses  # from ~ln(30522) = 10.3
    assert result["eval"]["perplexity"] == pytest.approx(torch.tensor(result["eval"]["loss"]).exp().item(), rel=1e-4)
    model = AutoModelForMaskedLM.from_pretrained(tmp_path / "final", trust_remote_code=True)
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
