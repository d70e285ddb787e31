"""HierarchicalXL hardening: the cache API (reset_rows, state_dict, rows at different positions, layout check),
bad inputs that get named errors, config validation, and the byte tokenizer treating text as bytes."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from training_utils import TINY_XL_CONFIG
from transformers import AutoConfig

from hier_transformers import (
    ByteTokenizer,
    HierarchicalConfig,
    HierarchicalXLCache,
    HierarchicalXLConfig,
    HierarchicalXLForCausalLM,
)


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


# ----------------------------------------------------------------------------------------------- model inputs


@torch.no_grad()
def test_bad_inputs_get_named_errors():
    model = tiny_model()
    input_ids = torch.randint(4, 40, (2, 10))
    cases = [
        (dict(input_ids=input_ids[:0]), "batch is empty"),
        (dict(input_ids=input_ids[:, :0]), "at least one token"),
        (dict(input_ids=input_ids.clone().index_fill_(1, torch.tensor([3]), 40)), r"\[0, vocab_size=40\)"),
        (dict(input_ids=input_ids.clone().index_fill_(1, torch.tensor([0]), -1)), r"got values in \[-1, "),
        (dict(input_ids=input_ids[None]), r"`input_ids` must be \[batch, seq_len\]"),
        (dict(input_ids=input_ids.float()), "integer token ids"),
        (dict(inputs_embeds=torch.randn(2, 10, 31)), "hidden_size=32"),
        (dict(inputs_embeds=torch.randn(2, 0, 32)), "at least one token"),
    ]
    for inputs, message in cases:
        with pytest.raises(ValueError, match=message):
            model(**inputs)


def test_output_attentions_is_refused_with_a_reason():
    model = tiny_model()
    input_ids = torch.randint(4, 40, (1, 9))
    with pytest.raises(ValueError, match="does not return attention weights"):
        model(input_ids, output_attentions=True)
    with pytest.raises(ValueError, match="does not return attention weights"):
        model.generate(input_ids, max_new_tokens=2, output_attentions=True, return_dict_in_generate=True)


def test_generate_refuses_an_empty_prompt_and_a_prompt_that_does_not_continue_the_cache():
    model = tiny_model()
    model.generation_config.eos_token_id = None
    with pytest.raises(ValueError, match="at least one token"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=3)
    output = model.generate(torch.randint(4, 40, (1, 10)), max_new_tokens=4, return_dict_in_generate=True)
    with pytest.raises(ValueError, match="the 13 columns the cache already holds"):
        model.generate(torch.randint(4, 40, (1, 5)), cache=output.cache, max_new_tokens=3)
    more = model.generate(output.sequences, cache=output.cache, max_new_tokens=3)  # the documented way works
    assert more.shape == (1, 17)


def test_a_cache_from_another_config_is_refused_by_name():
    model = tiny_model()
    other = tiny_model(patch_size=2)  # same tensor shapes per slot, other meaning
    cache = other(torch.randint(4, 40, (1, 9)), use_cache=True).cache
    with pytest.raises(ValueError, match="patch_size: cache 2 vs model 4"):
        model(torch.randint(4, 40, (1, 3)), cache=cache)
    with pytest.raises(TypeError, match="must be a HierarchicalXLCache"):
        model(torch.randint(4, 40, (1, 3)), cache=object())


def test_package_cache_works_with_the_same_model_loaded_as_remote_code(tmp_path):
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    from hier_transformers import segment_lm_step

    model = tiny_model()
    model.generation_config.eos_token_id = None
    model.save_pretrained(tmp_path)
    # what `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` gives in a process that had not
    # imported the package yet: the class from the folder's own copy of the code
    remote_class = get_class_from_dynamic_module("modeling_hierarchical_xl.HierarchicalXLForCausalLM", tmp_path)
    remote = remote_class.from_pretrained(tmp_path).eval()
    assert type(remote) is not HierarchicalXLForCausalLM and not type(remote).__module__.startswith("hier_transformers")
    input_ids = torch.randint(4, 40, (2, 21))
    loss, count, cache = segment_lm_step(remote, input_ids, segment_length=8)  # builds the package's cache
    expected_loss, _, _ = segment_lm_step(model, input_ids, segment_length=8)
    torch.testing.assert_close(loss, expected_loss)
    assert type(cache) is HierarchicalXLCache and cache.seen.tolist() == [21, 21]
    prompt = torch.randint(4, 40, (1, 6))
    ours = model.generate(prompt, cache=HierarchicalXLCache(model.config), max_new_tokens=8, do_sample=False)
    theirs = remote.generate(prompt, cache=HierarchicalXLCache(model.config), max_new_tokens=8, do_sample=False)
    assert torch.equal(ours, theirs)
    # ... and the remote module's cache works with the package's model
    remote_cache = remote(prompt, use_cache=True).cache
    assert type(remote_cache) is not HierarchicalXLCache
    model(prompt, cache=remote_cache)


# ----------------------------------------------------------------------------------------------- byte tokenizer


def test_byte_tokenizer_treats_special_token_strings_in_text_as_bytes():
    tokenizer = ByteTokenizer()
    texts = ["<pad>", "a <s> b </s> c <unk>", "plain", "</s></s>"]
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text.encode()) and min(ids) >= 4, text  # one byte token per byte: bits per byte
        assert tokenizer.decode(ids) == text
        assert tokenizer(text, split_special_tokens=False)["input_ids"] == ids  # no way to parse them out of text
    batch = tokenizer(texts, padding=True)
    for text, ids, mask in zip(texts, batch["input_ids"], batch["attention_mask"]):
        real = [token for token, keep in zip(ids, mask) if keep]
        assert len(real) == len(text.encode()) and tokenizer.decode(real) == text
    assert tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True) == texts
    flagged = ByteTokenizer(add_bos_token=True, add_eos_token=True)
    assert flagged("<s>")["input_ids"] == [flagged.bos_token_id, *(4 + byte for byte in b"<s>"), flagged.eos_token_id]


def test_byte_tokenizer_saves_its_bos_and_eos_flags(tmp_path):
    from transformers import AutoTokenizer

    ByteTokenizer(add_bos_token=True, add_eos_token=True).save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.add_bos_token and loaded.add_eos_token
    assert loaded("ab")["input_ids"] == [loaded.bos_token_id, 4 + ord("a"), 4 + ord("b"), loaded.eos_token_id]


def test_generate_script_accepts_an_empty_prompt():
    from training.generate import generate

    model = tiny_model(vocab_size=260)
    model.generation_config.eos_token_id = None
    text = generate(model, ByteTokenizer(), "", max_new_tokens=6, greedy=True, stream=False)
    assert isinstance(text, str) and text == generate(model, ByteTokenizer(), "", 6, greedy=True, stream=False)
