"""Supervising where retrieval looks (`retrieval_labels`, `copy_sources`, `retrieval_loss_weight`): the targets come
from the text alone (what followed the last occurrence of the current context), the loss is the selection's own
cross-entropy in every layer after the first, it is the same however the text is cut into calls, bad labels are
refused by name, and the stream trainer computes the same targets a whole document would give."""

from __future__ import annotations

import pytest
import torch
from training_utils import TINY_CLM_RUN, cli

from hier_transformers import HierarchicalXLCache, HierarchicalXLConfig, HierarchicalXLForCausalLM, copy_sources
from training import pretrain_clm
from training.streams import IGNORE_INDEX, StreamDataset

CONFIG = dict(vocab_size=40, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
              patch_size=4, local_window=8, max_patch_summaries=3, section_size=2, max_section_summaries=2,
              retrieval_top_k=2, retrieval_window=48, initializer_range=0.3)


def repeated_document(seed: int = 0) -> torch.Tensor:
    """A random phrase, other tokens, the phrase again: the second copy's tokens have a source 30 positions back."""
    generator = torch.Generator().manual_seed(seed)
    phrase, gap = torch.randint(4, 40, (14,), generator=generator), torch.randint(4, 40, (16,), generator=generator)
    return torch.cat([phrase, gap, phrase, torch.randint(4, 40, (20,), generator=generator)])


def test_copy_sources_point_after_the_last_occurrence_of_the_context():
    config = HierarchicalXLConfig(**CONFIG)
    tokens = repeated_document()
    labels = copy_sources(tokens, config, match=5)
    # the second copy starts at 30: from its 5th token on, the context matches the first copy 30 positions back
    for t in range(34, 43):
        assert labels[t] == t - 30 + 1, t
    assert bool((labels[:34] == -100).all())  # nothing repeats before
    # a third copy: the most recent occurrence wins
    again = torch.cat([tokens, tokens[:14]])
    assert int(copy_sources(again, config, match=5)[tokens.numel() + 10]) == 30 + 10 + 1
    # a match inside the local window is not a retrieval target (its patch is not selectable)
    close = torch.cat([tokens[:6], tokens[:6]])
    assert bool((copy_sources(close, config, match=5) == -100).all())
    # a window of the document that still holds every context a query may match (the stream trainer reads back
    # `retrieval_window + match` tokens) gives the whole document's labels for its queries
    whole = copy_sources(tokens, config, match=5)
    part = copy_sources(tokens[1:], config, match=5, offset=1, first=34)
    assert torch.equal(part, whole[35:])
    with pytest.raises(ValueError, match="`match`"):
        copy_sources(tokens, config, match=0)


def test_selection_loss_is_the_same_in_one_call_and_in_segments():
    torch.manual_seed(0)
    config = HierarchicalXLConfig(**CONFIG)
    model = HierarchicalXLForCausalLM(config).eval()
    tokens = torch.stack([repeated_document(0), repeated_document(1)])
    labels = torch.stack([copy_sources(row, config, match=5) for row in tokens])
    supervised = int((labels != -100).sum()) * (config.num_hidden_layers - 1)
    with torch.no_grad():
        whole = model(input_ids=tokens, retrieval_labels=labels).retrieval_loss
    assert torch.isfinite(whole) and float(whole) > 0
    cache, total = HierarchicalXLCache(config), 0.0
    for start in range(0, tokens.shape[1], 13):
        columns = slice(start, start + 13)
        with torch.no_grad():
            output = model(input_ids=tokens[:, columns], cache=cache, use_cache=True,
                           retrieval_labels=labels[:, columns])
        total += float(output.retrieval_loss) * int((labels[:, columns] != -100).sum()) * 2
        cache = output.cache
    assert abs(total / supervised - float(whole)) < 1e-5


def test_selection_loss_trains_the_choice_of_layers_after_the_first_only():
    torch.manual_seed(0)
    model = HierarchicalXLForCausalLM(HierarchicalXLConfig(**CONFIG)).train()
    tokens = repeated_document()[None]
    labels = copy_sources(tokens[0], model.config, match=5)[None]
    output = model(input_ids=tokens, retrieval_labels=labels)
    assert output.loss is None  # `loss` is the LM loss, only with `labels`
    output.retrieval_loss.backward()
    layers = model.model.layers
    assert layers[-1].self_attn.q_proj.weight.grad.abs().sum() > 0  # the deepest layer's queries choose
    assert layers[-1].mlp.down_proj.weight.grad is None or not layers[-1].mlp.down_proj.weight.grad.any()
    # the first layer's own choice is not supervised (its queries are the tokens): one layer, nothing to supervise
    single = HierarchicalXLForCausalLM(HierarchicalXLConfig(**(CONFIG | {"num_hidden_layers": 1})))
    assert float(single(input_ids=tokens, retrieval_labels=labels).retrieval_loss) == 0.0


@pytest.mark.parametrize("own_query", [False, True], ids=["content-query", "choice-query"])
def test_training_on_the_selection_loss_makes_the_deeper_layers_choose_the_source(own_query):
    """Fresh random documents every step (nothing to memorise), scored on other held-out ones: the loss falls below
    chance (the log of the number of selectable patches), so the deeper layers learned to choose by context. With
    `retrieval_choice_query` the deepest layer's query and key projections and its MLP stay as they were (the loss
    reaches the layers below only through the choice query's input, the token state)."""
    torch.manual_seed(0)
    # the choice query scores summary keys it cannot move: at initializer_range 0.02 they hardly tell patches apart
    # (2.10 -> 1.99 in 100 steps at lr 1e-2), at 0.1 they do, as a trained model's keys do
    init = 0.1 if own_query else 0.02
    config = HierarchicalXLConfig(**(CONFIG | {"initializer_range": init, "retrieval_choice_query": own_query}))
    model = HierarchicalXLForCausalLM(config).train()
    initial = {name: weight.detach().clone() for name, weight in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)  # no decay: no gradient, no move

    def batch(seeds) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.stack([repeated_document(seed) for seed in seeds])
        return tokens, torch.stack([copy_sources(row, config, match=5) for row in tokens])

    held, held_labels = batch(range(10_000, 10_016))
    with torch.no_grad():
        before = float(model(input_ids=held, retrieval_labels=held_labels).retrieval_loss)
    for step in range(100):
        tokens, labels = batch(range(16 * step, 16 * step + 16))
        model(input_ids=tokens, retrieval_labels=labels).retrieval_loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        after = float(model(input_ids=held, retrieval_labels=held_labels).retrieval_loss)
    assert after < 0.9 * before, (before, after)  # measured 2.10 -> 1.80 (content query), 2.11 -> 1.58 (own)
    moved = {name for name, weight in model.named_parameters() if not torch.equal(weight, initial[name])}
    deepest = {"model.layers.2.self_attn.q_proj.weight", "model.layers.2.self_attn.k_proj.weight"}
    if own_query:
        assert {f"model.layers.{i}.self_attn.choice_query" for i in (1, 2)} <= moved
        assert not moved & (deepest | {name for name in initial if name.startswith("model.layers.2.mlp.")})
    else:
        assert deepest <= moved


def test_choice_query_starts_as_the_model_without_it_and_only_the_selection_loss_trains_it(tmp_path):
    """At 0 (its initialisation) the choice query changes nothing: a checkpoint trained without it loads with it
    switched on and gives the same logits and selection loss, and the selection loss then reaches nothing else. The
    LM loss never reaches it; the selection loss never reaches the choosing layer's own query and key projections."""
    torch.manual_seed(0)
    HierarchicalXLForCausalLM(HierarchicalXLConfig(**CONFIG)).save_pretrained(tmp_path / "without")
    without = HierarchicalXLForCausalLM.from_pretrained(tmp_path / "without").train()
    with_query = HierarchicalXLForCausalLM.from_pretrained(tmp_path / "without", retrieval_choice_query=True).train()
    assert not hasattr(with_query.model.layers[0].self_attn, "choice_query")  # the first layer is not supervised
    tokens = torch.stack([repeated_document(0), repeated_document(1)])
    labels = torch.stack([copy_sources(row, with_query.config, match=5) for row in tokens])
    reference = without(input_ids=tokens, labels=tokens, retrieval_labels=labels)
    output = with_query(input_ids=tokens, labels=tokens, retrieval_labels=labels)
    torch.testing.assert_close(output.logits, reference.logits, atol=0, rtol=0)
    torch.testing.assert_close(output.retrieval_loss, reference.retrieval_loss, atol=0, rtol=0)

    def reached(loss: torch.Tensor) -> set[str]:
        with_query.zero_grad()
        loss.backward(retain_graph=True)
        return {name for name, weight in with_query.named_parameters() if weight.grad is not None and weight.grad.any()}

    own = {f"model.layers.{i}.self_attn.choice_query" for i in (1, 2)}
    assert reached(output.retrieval_loss) == own
    assert not reached(output.loss) & own
    assert "model.layers.2.self_attn.q_proj.weight" in reached(output.loss)
    with torch.no_grad():  # trained: the choice query reads the token state, which the layers below make
        for layer in with_query.model.layers[1:]:
            layer.self_attn.choice_query.normal_(0.0, 0.3)
    output = with_query(input_ids=tokens, labels=tokens, retrieval_labels=labels)
    selection = reached(output.retrieval_loss)
    assert own <= selection and "model.layers.0.self_attn.q_proj.weight" in selection
    assert not selection & {"model.layers.2.self_attn.q_proj.weight", "model.layers.2.self_attn.k_proj.weight"}
    assert not reached(output.loss) & own


@pytest.mark.parametrize(
    "overrides, labels, message",
    [
        ({"retrieval_top_k": 0}, None, "retrieval_top_k"),
        ({}, torch.full((1, 5), -100), r"\[batch, seq_len\]"),
        ({}, "near", "selectable patch"),
    ],
)
def test_bad_retrieval_labels_are_refused_by_name(overrides, labels, message):
    model = HierarchicalXLForCausalLM(HierarchicalXLConfig(**(CONFIG | overrides)))
    tokens = repeated_document()[None]
    if labels is None:
        labels = torch.full_like(tokens, -100)
    elif isinstance(labels, str):  # a query pointing inside its own local window
        labels = torch.full_like(tokens, -100)
        labels[0, 40] = 38
    with pytest.raises(ValueError, match=message) as error:
        model(input_ids=tokens, retrieval_labels=labels)
    assert "retrieval" in str(error.value)


def test_stream_items_carry_the_targets_of_the_whole_document():
    config = HierarchicalXLConfig(**(CONFIG | {"vocab_size": 260}))
    generator = torch.Generator().manual_seed(0)
    phrase = torch.randint(3, 260, (20,), generator=generator).tolist()
    docs = [[1, *phrase, *torch.randint(3, 260, (n,), generator=generator).tolist(), *phrase, 2]
            for n in (30, 70, 10, 45)]
    data = StreamDataset(docs, rows=1, num_processes=1, block_size=32, segment_length=16, pad_token_id=0, seed=0,
                         copy_match=6, config=config)
    labels = torch.cat([data[step]["retrieval_labels"] for step in range(len(data))])
    ids, starts = data.input_ids[0], torch.nonzero(data.starts[0]).flatten().tolist() + [None]
    found = 0
    for first, stop in zip(starts, starts[1:]):  # each document on its own, positions from its first token
        begin = first * 16
        end = stop * 16 if stop is not None else ids.numel()
        real = int(data.real[0, begin:end].sum())
        expected = copy_sources(ids[begin:begin + real], config, match=6)
        assert torch.equal(labels[begin:begin + real], expected)
        assert bool((labels[begin + real:end] == IGNORE_INDEX).all())
        found += int((expected != -100).sum())
    assert found > 0  # the repeated phrase gave targets


def test_the_trainer_adds_the_selection_loss_and_checks_its_knobs(tmp_path):
    retrieval = {"model.retrieval_top_k": 2, "model.retrieval_window": 64, "final_eval": "false", "max_steps": 4}
    result = pretrain_clm.main(cli({**TINY_CLM_RUN, **retrieval, "output_dir": tmp_path / "run",
                                    "retrieval_loss_weight": 1.0, "retrieval_match": 8}))
    assert result["run_config"]["retrieval_loss_weight"] == 1.0 and result["steps"] == 4
    with pytest.raises(ValueError, match="retrieval_loss_weight"):
        pretrain_clm.main(cli({**TINY_CLM_RUN, "output_dir": tmp_path / "off", "retrieval_loss_weight": 1.0}))
    with pytest.raises(ValueError, match="retrieval_match"):
        pretrain_clm.main(cli({**TINY_CLM_RUN, **retrieval, "output_dir": tmp_path / "bad",
                               "retrieval_loss_weight": 1.0, "retrieval_match": 0}))
