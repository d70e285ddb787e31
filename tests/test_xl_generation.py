"""HierarchicalXL generation: cached == uncached for greedy / sampling / beam search, bounded memory."""

from __future__ import annotations

import pytest
import torch

from hier_transformers import ByteTokenizer, HierarchicalXLCache, HierarchicalXLConfig, HierarchicalXLForCausalLM


def tiny_model(**overrides) -> HierarchicalXLForCausalLM:
    values = dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        patch_size=4, local_window=6, max_patch_summaries=3, section_size=2, max_section_summaries=2,
    )
    torch.manual_seed(0)
    model = HierarchicalXLForCausalLM(HierarchicalXLConfig(**(values | overrides))).eval()
    model.generation_config.eos_token_id = None  # run to max_new_tokens
    return model


@pytest.fixture(scope="module")
def prompts():
    return ByteTokenizer()(["The quick brown fox jumps", "Hi", "over the lazy"], return_tensors="pt", padding=True)


@pytest.mark.parametrize(
    "options",
    [dict(do_sample=False), dict(do_sample=True, top_k=20), dict(num_beams=3, do_sample=False)],
    ids=["greedy", "sampling", "beam"],
)
def test_cached_and_uncached_generation_agree(prompts, options):
    model = tiny_model()
    new_tokens = 60  # 10x the window, 15 patches, several sections: every bound is hit
    torch.manual_seed(1)
    cached = model.generate(**prompts, max_new_tokens=new_tokens, use_cache=True, **options)
    torch.manual_seed(1)
    uncached = model.generate(**prompts, max_new_tokens=new_tokens, use_cache=False, **options)
    assert cached.shape == (3, prompts["input_ids"].shape[1] + new_tokens)
    assert torch.equal(cached, uncached)


def test_generate_creates_and_returns_the_hierarchical_cache(prompts):
    model = tiny_model()
    output = model.generate(**prompts, max_new_tokens=5, return_dict_in_generate=True)
    assert isinstance(output.cache, HierarchicalXLCache)
    assert output.cache.get_seq_length() == output.sequences.shape[1] - 1  # the last token is not fed back
    lengths = prompts["attention_mask"].sum(1) + 4
    assert output.cache.seen.tolist() == lengths.tolist()


def test_right_padded_prompts_are_refused(prompts):
    model = tiny_model()
    right = ByteTokenizer(padding_side="right")(["a longer prompt", "b"], return_tensors="pt", padding=True)
    with pytest.raises(ValueError, match="padding_side = 'left'"):
        model.generate(**right, max_new_tokens=3)


def test_cache_memory_stops_growing_over_a_long_generation():
    model = tiny_model(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    start = torch.tensor([[1]])
    first = model.generate(start, max_new_tokens=200, do_sample=True, return_dict_in_generate=True)
    size = first.cache.nbytes()
    cache = first.cache
    sequence = first.sequences
    for _ in range(4):  # 20k+ tokens in total, continuing the same cache
        output = model.generate(
            sequence, cache=cache, max_new_tokens=5000, do_sample=True, return_dict_in_generate=True
        )
        sequence, cache = output.sequences, output.cache  # the full sequence: generate feeds only the new part
        assert cache.nbytes() == size
    assert cache.seen.item() > 20_000
