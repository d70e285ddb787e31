"""Warm start from BERT (the offline MiniLM): exact equivalence where the hierarchy is not involved, copied weights,
validation, and the `training/warm_start.py` CLI."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertModel

from hier_transformers import (
    HierarchicalConfig,
    HierarchicalForSequenceClassification,
    HierarchicalModel,
    hierarchical_from_pretrained_bert,
    minilm_path,
)
from hier_transformers.warm_start import bert_parameter_map

ROOT = Path(__file__).resolve().parents[1]
PATCH = 16


@pytest.fixture(scope="module")
def bert() -> BertModel:
    return BertModel.from_pretrained(minilm_path()).eval()


def test_token_level_equals_bert_on_each_patch(bert):
    """With a token-only layout each patch is an independent BERT input `[CLS] tokens` (the patch slot is BERT's
    `[CLS]`): token states and patch summaries equal BertModel's, padding inside a patch included."""
    model, tokenizer = hierarchical_from_pretrained_bert(
        model_class=HierarchicalModel, patch_size=PATCH, section_size=2, hierarchy_layout=["token"] * 6
    )
    sentences = ["the committee approved the budget after a long debate.", "rain is expected tomorrow."]
    pieces = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in sentences]
    input_ids = torch.zeros(1, 2 * PATCH, dtype=torch.long)
    attention_mask = torch.zeros(1, 2 * PATCH, dtype=torch.long)
    for index, piece in enumerate(pieces):
        assert len(piece) < PATCH
        input_ids[0, index * PATCH : index * PATCH + len(piece)] = torch.tensor(piece)
        attention_mask[0, index * PATCH : index * PATCH + len(piece)] = 1
    with torch.no_grad():
        outputs = model(input_ids, attention_mask=attention_mask)
        for index, piece in enumerate(pieces):
            reference = bert(torch.tensor([[tokenizer.cls_token_id, *piece]])).last_hidden_state[0]
            ours = outputs.last_hidden_state[0, index * PATCH : index * PATCH + len(piece)]
            torch.testing.assert_close(ours, reference[1:], atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(outputs.patch_summaries[0, index], reference[0], atol=2e-5, rtol=1e-4)


def test_weights_are_copied_tensor_for_tensor(bert):
    model, _ = hierarchical_from_pretrained_bert(patch_size=PATCH, section_size=4, num_hidden_layers=4, num_labels=3)
    assert model.config.num_hidden_layers == 4 and model.config.hidden_size == 384 and model.config.num_labels == 3
    ours = dict(model.named_parameters())
    theirs = bert.state_dict()
    mapping = bert_parameter_map(4, "model.")
    assert len(mapping) == 5 + 16 * 4  # 3 embedding tables + LayerNorm; 8 weight/bias pairs per layer
    for our_name, their_name in mapping.items():
        assert torch.equal(ours[our_name], theirs[their_name]), our_name
    assert torch.equal(ours["pooler.dense.weight"], theirs["pooler.dense.weight"])
    cls_id = AutoTokenizer.from_pretrained(minilm_path()).cls_token_id
    assert torch.equal(ours["model.embeddings.patch_slot"], theirs["embeddings.word_embeddings.weight"][cls_id])
    # higher levels start fresh (BERT-style init), not as copies of the token level
    fresh = ours["model.layers.0.patch_level.attention.q_proj.weight"]
    assert not torch.equal(fresh, ours["model.layers.0.token_level.attention.q_proj.weight"])
    assert 0.015 < fresh.std().item() < 0.025
    assert not model.training


def test_overrides_that_contradict_the_checkpoint_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="hidden_size"):
        hierarchical_from_pretrained_bert(hidden_size=256)
    with pytest.raises(ValueError, match="num_hidden_layers"):
        hierarchical_from_pretrained_bert(num_hidden_layers=7)
    with pytest.raises(ValueError, match="patch_size"):
        hierarchical_from_pretrained_bert(patch_size=0)
    HierarchicalConfig(num_hidden_layers=1).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="bert_path"):
        hierarchical_from_pretrained_bert(tmp_path)


def test_cli_writes_a_ready_to_fine_tune_folder(tmp_path):
    spec = importlib.util.spec_from_file_location("warm_start_cli", ROOT / "training" / "warm_start.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    folder = cli.main([
        "--output-dir", str(tmp_path / "ckpt"), "--labels", "sports", "politics", "science",
        "--patch-size", "32", "--section-size", "4", "--num-hidden-layers", "2", "--layout", "token+patch+section",
    ])
    names = {path.name for path in folder.iterdir()}
    assert {"model.safetensors", "config.json", "modeling_hierarchical.py", "tokenizer.json"} <= names
    assert not any(name.endswith((".bin", ".pt", ".pth", ".pkl")) for name in names)
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert isinstance(model, HierarchicalForSequenceClassification)
    assert model.config.id2label == {0: "sports", 1: "politics", 2: "science"}
    assert model.config.hierarchy_layout == ["token+patch+section"] * 2
    document = "the striker scored twice in the second half. " * 80  # far beyond BERT's 512 positions
    encoding = tokenizer(document, return_tensors="pt")
    assert encoding["input_ids"].shape[1] > 600
    with torch.no_grad():
        assert model(**encoding).logits.shape == (1, 3)
    reference, _ = hierarchical_from_pretrained_bert(patch_size=32, section_size=4, num_hidden_layers=2, num_labels=3)
    assert torch.equal(
        model.model.layers[1].token_level.feed_forward.up_proj.weight,
        reference.model.layers[1].token_level.feed_forward.up_proj.weight,
    )
