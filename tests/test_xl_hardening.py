"""HierarchicalXL hardening: the cache API (reset_rows, state_dict, rows at different positions, layout check),
bad inputs that get named errors, config validation, and the byte tokenizer treating text as bytes."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from training_utils import TINY_XL_CONFIG

from transformers import AutoConfig

from hier_transformers import HierarchicalConfig, HierarchicalXLCache, HierarchicalXLConfig, HierarchicalXLForCausalLM


def tiny_model(**overrides) -> HierarchicalXLForCausalLM:
    torch.manual_seed(0)
    return HierarchicalXLForCausalLM(HierarchicalXLConfig(**(TINY_XL_CONFIG | {"vocab_size": 40} | overrides))).eval()


def continue_alone(model, prefix: torch.Tensor | None, chunk: torch.Tensor) -> torch.Tensor:
    """Logits of `chunk` [1, n] after `prefix` [1, m] (or from a fresh cache), one row alone."""
    cache = HierarchicalXLCache(model.config)
    if prefix is not None:
        model(prefix, cache=cache, use_cache=True)
    return model(chunk, cache=cache, use_cache=True).logits


# ----------------------------------------------------------------------------------------------- cache API


@torch.no_grad()
def test_reset_rows_makes_a_row_fresh_and_leaves_the_others_alone():
    model = tiny_model()
    first, second, third = torch.randint(4, 40, (3, 3, 23)).unbind(0)
    cache = HierarchicalXLCache(model.config)
    model(first, cache=cache, use_cache=True)
    cache.reset_rows(torch.tensor([False, True, False]))
    assert cache.seen.tolist() == [23, 0, 23]
    # rows now stand at different positions (23, 0, 23): a plain forward, no attention_mask, all tokens real
    logits = model(second, cache=cache, use_cache=True).logits
    torch.testing.assert_close(logits[1:2], continue_alone(model, None, second[1:2]), atol=1e-5, rtol=1e-5)
    for row in (0, 2):
        expected = continue_alone(model, first[row : row + 1], second[row : row + 1])
        torch.testing.assert_close(logits[row : row + 1], expected, atol=1e-5, rtol=1e-5)
    # ... and it keeps going: each row continues its own stream
    logits = model(third, cache=cache, use_cache=True).logits
    alone = continue_alone(model, second[1:2], third[1:2])
    torch.testing.assert_close(logits[1:2], alone, atol=1e-5, rtol=1e-5)
    expected = continue_alone(model, torch.cat([first[:1], second[:1]], 1), third[:1])
    torch.testing.assert_close(logits[:1], expected, atol=1e-5, rtol=1e-5)


def test_rows_at_different_positions_train_with_gradients():
    model = tiny_model()
    model.train()
    cache = HierarchicalXLCache(model.config)
    with torch.no_grad():
        model(torch.randint(4, 40, (2, 13)), cache=cache, use_cache=True)
    cache.reset_rows(torch.tensor([True, False]))
    cache = cache.detached()
    chunk = torch.randint(4, 40, (2, 17))
    output = model(chunk, labels=chunk, cache=cache, use_cache=True)
    output.loss.backward()
    assert torch.isfinite(output.loss) and cache.seen.tolist() == [17, 30]
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_reset_rows_refuses_a_wrong_mask():
    model = tiny_model()
    cache = model(torch.randint(4, 40, (2, 5)), use_cache=True).cache
    with pytest.raises(ValueError, match="`rows` must be a bool tensor of shape"):
        cache.reset_rows(torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="`rows` must be a bool tensor of shape"):
        cache.reset_rows(torch.tensor([True, False, True]))


@torch.no_grad()
def test_cache_state_dict_round_trips_exactly_through_safetensors(tmp_path):
    model = tiny_model()
    prefix, chunk = torch.randint(4, 40, (2, 2, 19)).unbind(0)
    cache = model(prefix, use_cache=True).cache
    save_file(cache.state_dict(), tmp_path / "cache.safetensors")
    restored = HierarchicalXLCache(model.config)
    restored.load_state_dict(load_file(tmp_path / "cache.safetensors"))
    assert restored.get_seq_length() == 19 and restored.seen.tolist() == [19, 19]
    assert restored.state_dict().keys() == cache.state_dict().keys()
    for name, tensor in cache.state_dict().items():
        assert torch.equal(restored.state_dict()[name], tensor), name
    expected = model(chunk, cache=cache).logits
    torch.testing.assert_close(model(chunk, cache=restored).logits, expected, atol=0, rtol=0)

    empty = HierarchicalXLCache(model.config)
    save_file(empty.state_dict(), tmp_path / "empty.safetensors")
    again = HierarchicalXLCache(model.config)
    again.load_state_dict(load_file(tmp_path / "empty.safetensors"))
    assert again.seen is None and again.get_seq_length() == 0 and not again.layers[0].is_initialized
    torch.testing.assert_close(model(chunk, cache=again).logits, model(chunk, use_cache=False).logits)

    other = HierarchicalXLCache(tiny_model(patch_size=2).config)
    with pytest.raises(ValueError, match="patch_size"):
        other.load_state_dict(cache.state_dict())


# ----------------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("config_class", [HierarchicalXLConfig, HierarchicalConfig])
def test_unknown_config_keys_are_named_but_saved_configs_load(tmp_path, config_class):
    with pytest.raises(ValueError, match=r"unknown keys `patch_sizee` \(did you mean `patch_size`\?\).*Valid fields"):
        config_class(patch_sizee=4)
    # transformers' own keyword arguments and bookkeeping keys stay accepted
    config = config_class(torch_dtype="float32", num_labels=3, attn_implementation="eager", name_or_path="here",
                          output_attentions=False)
    assert config.num_labels == 3 and config._attn_implementation == "eager"
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is config_class and loaded.to_diff_dict() == config.to_diff_dict()
    assert config_class.from_dict(config.to_dict()).to_diff_dict() == config.to_diff_dict()


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(hidden_act="gelux"), "hidden_act"),
        (dict(pad_token_id=40), "pad_token_id"),
        (dict(bos_token_id=-1), "bos_token_id"),
        (dict(eos_token_id=[2, 99]), "eos_token_id"),
        (dict(rope_theta="10000"), "rope_theta"),
        (dict(use_cache="yes"), "use_cache"),
    ],
)
def test_xl_config_rejects_values_that_fail_later(overrides, field):
    with pytest.raises(ValueError, match=field):
        HierarchicalXLConfig(**(TINY_XL_CONFIG | {"vocab_size": 40} | overrides))


@pytest.mark.parametrize("config_class", [HierarchicalXLConfig, HierarchicalConfig])
def test_save_pretrained_validates_and_writes_no_config(tmp_path, config_class):
    config = config_class()
    config.patch_size = 0  # attributes can be set after construction: save is the last gate
    with pytest.raises(ValueError, match="patch_size"):
        config.save_pretrained(tmp_path / "config")
    assert not (tmp_path / "config" / "config.json").exists()


def test_xl_model_save_pretrained_writes_nothing_for_an_invalid_config(tmp_path):
    model = tiny_model()
    model.config.local_window = 2  # < patch_size
    with pytest.raises(ValueError, match="local_window"):
        model.save_pretrained(tmp_path / "model")
    assert not (tmp_path / "model").exists()


@torch.no_grad()
def test_forward_without_cache_allocates_nothing_of_the_window_size():
    model = tiny_model(local_window=10**11)  # a window of 10^11 tokens: any allocation of that size would fail
    reference = tiny_model(local_window=64)  # same weights; the window covers the whole input either way
    input_ids = torch.randint(4, 40, (2, 50))
    torch.testing.assert_close(model(input_ids, use_cache=False).logits, reference(input_ids, use_cache=False).logits)
