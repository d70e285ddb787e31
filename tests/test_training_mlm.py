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


def test_whole_word_masking_selects_every_piece_of_a_chosen_word():
    from training.common import load_tokenizer

    tokenizer = load_tokenizer("minilm")
    text = "unbelievably photosynthesis antidisestablishmentarianism is hyperventilating " * 20
    input_ids = torch.tensor([tokenizer(text)["input_ids"]] * 8)
    attention_mask = torch.ones_like(input_ids)
    starts = pretrain_mlm.word_starts(tokenizer)
    assert not starts[input_ids].all()  # the text has multi-piece words
    _, labels = pretrain_mlm.mask_tokens(input_ids, attention_mask, list(tokenizer.all_special_ids),
                                         tokenizer.mask_token_id, len(tokenizer), 0.3, torch.Generator().manual_seed(0),
                                         starts)
    selected = labels != -100
    continuation = ~starts[input_ids]
    # a continuation piece is selected exactly when the piece before it is (so whole words, never parts)
    assert torch.equal(selected[:, 1:][continuation[:, 1:]], selected[:, :-1][continuation[:, 1:]])
    words = starts[input_ids] & (attention_mask.bool()) & ~torch.isin(input_ids, torch.tensor(tokenizer.all_special_ids))
    assert 0.2 < selected[words].float().mean() < 0.4  # the probability is per word


def test_logits_to_keep_gives_the_full_forwards_logits_and_loss_at_those_positions():
    from hier_transformers import HierarchicalConfig, HierarchicalForMaskedLM
    from training_utils import TINY_ENCODER_CONFIG

    torch.manual_seed(0)
    model = HierarchicalForMaskedLM(HierarchicalConfig(**TINY_ENCODER_CONFIG)).eval()
    input_ids = torch.randint(1, 50, (2, 16))
    labels = torch.where(torch.rand(2, 16) < 0.3, input_ids, -100)
    labels[0, 0] = input_ids[0, 0]
    full = model(input_ids=input_ids, labels=labels)
    kept = model(input_ids=input_ids, labels=labels, logits_to_keep=labels != -100)
    assert kept.logits.shape == (int((labels != -100).sum()), 50)
    torch.testing.assert_close(kept.logits, full.logits[labels != -100], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kept.loss, full.loss, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(input_ids=input_ids, logits_to_keep=(labels != -100)[:, :8])


def test_long_documents_corpus_holds_no_downstream_test_text():
    from hier_transformers.data import load_long_documents, load_news_articles, load_shakespeare, split_at_paragraphs

    corpus = load_long_documents()
    assert set(corpus["train"]["source"]) == {"news", "20newsgroups", "shakespeare"}
    assert set(corpus["validation"]["source"]) == {"news", "shakespeare"}
    news_test = set(load_news_articles()["test"]["text"])
    for split in ("train", "validation"):
        assert not news_test & set(corpus[split]["text"])
    assert not set(corpus["train"]["text"]) & set(corpus["validation"]["text"])
    work = load_shakespeare()["train"]["text"][0]
    pieces = split_at_paragraphs(work, 8000)
    assert "\n\n".join(pieces) == work and len(pieces) > 1  # nothing lost
    assert all(len(piece) <= 8000 or "\n\n" not in piece for piece in pieces)  # only a single paragraph is longer


def test_long_document_recipe_and_its_windowed_peer_train_and_score_the_same_masked_tokens(tmp_path):
    """The MiniLM warm start (whole-word masking, fixed layout) and MiniLM over independent windows train through the
    command; eval_mlm scores both on the same masked tokens and writes the comparison into the card."""
    from training import eval_mlm

    run = {"corpus": "long_documents", "init": "minilm", "masking": "whole_word", "layout": "fixed",
           "max_length": 256, "per_device_batch_size": 2, "max_steps": 2, "warmup_steps": 0, "learning_rate": 1e-4,
           "max_train_documents": 16, "max_eval_documents": 4, "max_eval_batches": 1, "trackers": "[jsonl]",
           "log_every": 1, "eval_every": 2, "save_every": 2, "mixed_precision": "no"}
    ours = tmp_path / "ours"
    pretrain_mlm.main(cli({**run, **{"model.num_hidden_layers": 1, "model.patch_size": 32, "model.section_size": 2,
                                     "model.hidden_dropout_prob": 0.0, "model.attention_dropout": 0.0},
                           "output_dir": ours}))
    card = (ours / "final" / "README.md").read_text()
    assert "masked-token accuracy, this model reading each whole document" in card
    peer = tmp_path / "peer"
    pretrain_mlm.main(cli({**run, "baseline": "minilm-windows", "window": 64, "final_eval": "false",
                           "model.hidden_dropout_prob": 0.0, "output_dir": peer}))
    result = eval_mlm.evaluate_folders(ours / "final", windows=peer / "final", update_card=True)
    assert result["documents"] == 4 and result["masked_tokens"] > 50
    for name in ("hierarchical", "windows", "difference"):
        low, high = result[name]["ci95"]
        assert low <= result[name]["accuracy"] <= high
    assert result["difference"]["accuracy"] == pytest.approx(
        result["hierarchical"]["accuracy"] - result["windows"]["accuracy"], abs=1e-9)
    assert "independent 64-token windows" in (ours / "final" / "README.md").read_text()
    itself = eval_mlm.evaluate_folders(ours / "final", against=ours / "final")  # the same model: exactly no difference
    assert itself["difference_against"] == {"accuracy": 0.0, "ci95": [0.0, 0.0]}
    assert itself["against"]["accuracy"] == result["hierarchical"]["accuracy"]
    with pytest.raises(ValueError, match="init='minilm'"):
        pretrain_mlm.main(cli({**run, "baseline": "minilm-windows", "init": "scratch", "output_dir": tmp_path / "x"}))


def test_a_micro_batch_without_masked_tokens_gives_zero_loss_not_nan():
    from hier_transformers import HierarchicalConfig, HierarchicalForMaskedLM
    from training_utils import TINY_ENCODER_CONFIG

    objective = pretrain_mlm.MaskedLM(pretrain_mlm.MLMRunConfig())
    objective.special_ids, objective.mask_token_id, objective.vocab_size, objective.starts = [0], 3, 50, None
    model = HierarchicalForMaskedLM(HierarchicalConfig(**TINY_ENCODER_CONFIG))
    batch = {"input_ids": torch.tensor([[5, 6, 0, 0]]), "attention_mask": torch.tensor([[1, 1, 0, 0]])}
    loss = objective._loss(model, batch, batch["input_ids"], torch.full((1, 4), -100))
    assert loss.item() == 0.0
    loss.backward()  # no masked token: no gradient anywhere, and nothing NaN
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
