"""The top-down path (`top_down="summary_keys"`): every token feels the other sections of its document, also in a
2-layer model, while padding side and a token-only (BERT) layout change nothing."""

from __future__ import annotations

import pytest
import torch

from hier_transformers import HierarchicalConfig, HierarchicalForSequenceClassification, HierarchicalModel


def issue_config(num_layers: int, top_down: str) -> HierarchicalConfig:
    """The setting of issue 9: hidden 64, patch 8, section 4, documents of 64 tokens (2 sections), at init."""
    return HierarchicalConfig(
        vocab_size=1000, hidden_size=64, num_hidden_layers=num_layers, num_attention_heads=4, intermediate_size=256,
        patch_size=8, section_size=4, max_position_embeddings=64, hidden_dropout_prob=0.0, attention_dropout=0.0,
        top_down=top_down,
    )


def influence_on_first_token(model: HierarchicalModel) -> tuple[float, float]:
    """How much token 0's final state moves per unit change of an input embedding: mean over its 7 patch neighbours,
    mean over the 32 tokens of the other section (norms of the Jacobian rows)."""
    input_ids = torch.randint(5, 1000, (1, 64))
    embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_()
    first = model(inputs_embeds=embeds).last_hidden_state[0, 0]
    (grad,) = torch.autograd.grad(first.norm(), embeds)
    per_token = grad[0].norm(dim=-1)  # [64]
    return per_token[1:8].mean().item(), per_token[32:].mean().item()


@pytest.mark.parametrize("num_layers", [2, 4])
def test_a_far_section_moves_the_first_token_by_at_least_one_percent_of_a_patch_neighbour(num_layers):
    neighbour, far = influence_on_first_token(HierarchicalModel(issue_config(num_layers, "summary_keys")).eval())
    assert far >= 0.01 * neighbour, (far, neighbour)
    old_neighbour, old_far = influence_on_first_token(HierarchicalModel(issue_config(num_layers, "none")).eval())
    assert old_far < 1e-4 * old_neighbour  # without the top-down path (exactly 0 with 2 layers)


@pytest.mark.parametrize("top_down", ["summary_keys", "none"])
def test_left_padding_gives_the_logits_of_the_row_alone(top_down):
    """Left padding used to shift every patch boundary (batch-dependent logits, 4e-3); now rows are laid out from
    their first real token."""
    config = issue_config(2, top_down)
    config.num_labels = 3
    model = HierarchicalForSequenceClassification(config).eval()
    short, long = torch.randint(5, 1000, (1, 21)), torch.randint(5, 1000, (1, 50))
    batch = torch.cat([torch.cat([torch.zeros(1, 29, dtype=torch.long), short], dim=1), long])
    mask = torch.ones_like(batch)
    mask[0, :29] = 0
    with torch.no_grad():
        together = model(batch, attention_mask=mask, output_hidden_states=True)
        alone = model(short, output_hidden_states=True)
        torch.testing.assert_close(together.logits[0], alone.logits[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(together.logits[1], model(long).logits[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(together.hidden_states[-1][0, 29:], alone.hidden_states[-1][0], atol=1e-5, rtol=1e-5)
        embeds = model.get_input_embeddings()(batch)  # the inputs_embeds path is rolled the same way
        torch.testing.assert_close(model(inputs_embeds=embeds, attention_mask=mask).logits, together.logits)


def test_token_only_layout_reads_no_summaries():
    """A token-only layout has no summaries to read: every patch stays an independent BERT input (the warm start
    equivalence in test_warm_start relies on it), whatever top_down says."""
    config = issue_config(2, "summary_keys")
    config.hierarchy_layout = ["token", "token"]
    model = HierarchicalModel(config).eval()
    input_ids = torch.randint(5, 1000, (1, 64))
    changed = input_ids.clone()
    changed[0, 40] = 7
    with torch.no_grad():
        first, second = model(input_ids).last_hidden_state, model(changed).last_hidden_state
    assert torch.equal(first[0, :32], second[0, :32])
