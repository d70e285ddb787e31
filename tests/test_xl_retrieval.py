"""HierarchicalXL coarse-to-fine retrieval (`retrieval_top_k > 0`): off changes nothing, reach, causality, one call ==
segments == token by token (with a checked score margin), left padding, generation, save/load + remote code, bounded
cache. The rule itself is checked against a dense reference in test_xl_model.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import last_json_line, run_without_package
from hier_transformers import HierarchicalXLCache, HierarchicalXLConfig, HierarchicalXLForCausalLM
from hier_transformers.modeling_hierarchical_xl import HierarchicalXLAttention
from test_xl_model import assert_left_padded_rows_match_rows_alone, open_retrieval_gates, run_segments

BASE = dict(
    vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
    patch_size=4, local_window=6, max_patch_summaries=3, section_size=2, max_section_summaries=2,
)
# initializer_range 0.3 spreads the patch scores, so that float noise cannot reorder them (checked by `margins`)
RETRIEVAL = dict(retrieval_top_k=2, retrieval_window=24, initializer_range=0.3)


def tiny_model(**overrides) -> HierarchicalXLForCausalLM:
    torch.manual_seed(0)
    model = HierarchicalXLForCausalLM(HierarchicalXLConfig(**(BASE | RETRIEVAL | overrides))).eval()
    model.generation_config.eos_token_id = None
    return open_retrieval_gates(model)


@pytest.fixture
def margins(monkeypatch):
    """Records, for every real query of every call, the score gap between its last chosen and first unchosen
    selectable patch (inf when all selectable patches fit in top k)."""
    gaps = []
    select = HierarchicalXLAttention.select_patches

    def recording(self, logits, plan):
        spots, real, best = select(self, logits, plan)
        k = self.config.retrieval_top_k
        if best.shape[-1] > k:
            gap = best[..., k - 1] - best[..., k]  # nan/inf where fewer than k + 1 are selectable
            is_query = logits.abs().sum(dim=(1, 3)) > 0  # [N, block]: the block padding has zero queries (logits)
            gap = torch.where(torch.isfinite(gap) & is_query, gap, float("inf"))
            gaps.append(gap.min())
        return spots, real, best

    monkeypatch.setattr(HierarchicalXLAttention, "select_patches", recording)
    return gaps


def test_retrieval_off_leaves_model_and_cache_untouched():
    """retrieval_top_k = 0: retrieval_window is ignored (same logits, same cache layout and bytes as always)."""
    config_kwargs = {key: value for key, value in RETRIEVAL.items() if key != "retrieval_top_k"}
    off = tiny_model(retrieval_top_k=0, **config_kwargs)
    plain = tiny_model(retrieval_top_k=0, retrieval_window=6, initializer_range=0.3)
    input_ids = torch.randint(4, 40, (2, 40))
    with torch.no_grad():
        first, second = off(input_ids, use_cache=True), plain(input_ids, use_cache=True)
    torch.testing.assert_close(first.logits, second.logits, atol=0, rtol=0)
    assert first.cache.layers[0].keys["tokens"].shape[2] == BASE["local_window"] - 1
    assert first.cache.layers[0].keys["patches"].shape[2] == off.config.patch_memory
    assert "layout.retrieval_window" not in first.cache.state_dict()
    assert first.cache.nbytes() == second.cache.nbytes()


@pytest.mark.parametrize(
    "overrides, field",
    [(dict(retrieval_top_k=-1), "retrieval_top_k"), (dict(retrieval_top_k=1.5), "retrieval_top_k"),
     (dict(retrieval_window=5), "retrieval_window"), (dict(retrieval_softmax="flat"), "retrieval_softmax"),
     (dict(retrieval_recency=-1e-4), "retrieval_recency"), (dict(retrieval_recency="1e-4"), "retrieval_recency"),
     (dict(retrieval_top_k=0, retrieval_choice_query=True), "retrieval_choice_query"),
     (dict(retrieval_choice_query=1), "retrieval_choice_query")],
)
def test_config_rejects_invalid_retrieval_values(overrides, field):
    with pytest.raises(ValueError, match=field):
        HierarchicalXLConfig(**(BASE | RETRIEVAL | overrides))


@pytest.mark.parametrize("top_k", [0, 8])
def test_far_token_reaches_exactly_while_its_patch_is_selectable(top_k):
    """One layer, window 4, one patch summary, no sections: a token of patch 0 reaches t through the window
    (t <= 4) or its summary (4 <= t < 8); with retrieval (window 12, top_k = every selectable patch) also through
    its own bytes until it leaves the retrieval window (t < 12), never after."""
    model = tiny_model(num_hidden_layers=1, local_window=4, max_patch_summaries=1, section_size=None,
                       retrieval_top_k=top_k, retrieval_window=12)
    embeds = model.model.embed_tokens(torch.randint(4, 40, (1, 24))).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeds, use_cache=False).logits
    for t in range(1, 24):
        (grad,) = torch.autograd.grad(logits[0, t].sum(), embeds, retain_graph=True)
        assert (grad[0, 1].abs().max() > 0) == (t < (12 if top_k else 8)), t


def test_causality_with_retrieval():
    model = tiny_model()
    input_ids = torch.randint(4, 40, (2, 60))
    embeds = model.model.embed_tokens(input_ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeds, use_cache=False).logits
    for t in (0, 7, 12, 33, 58):
        (grad,) = torch.autograd.grad(logits[:, t].sum(), embeds, retain_graph=True)
        assert grad[:, t + 1 :].abs().max() == 0 and grad[:, t].abs().max() > 0
    with torch.no_grad():
        reference = model(input_ids, use_cache=False).logits
        for t, k in ((10, 1), (25, 6), (40, 13)):
            changed = input_ids.clone()
            changed[:, t + k] = (changed[:, t + k] + 7) % 36 + 4
            torch.testing.assert_close(model(changed, use_cache=False).logits[:, : t + 1], reference[:, : t + 1],
                                       atol=0, rtol=0)
            torch.testing.assert_close(run_segments(model, changed, [3, 5])[:, : t + 1], reference[:, : t + 1],
                                       atol=1e-5, rtol=1e-5)


def test_training_reaches_every_candidate_so_every_choice_score_learns():
    """In training mode the loss reaches every selectable far patch (the unchosen through their summaries), so the
    score of every candidate learns, not only of the ones top k chose; in eval mode only the chosen patch is reached.
    One layer, one summary, no sections, top 1: at the last query, the far patches reached."""
    model = tiny_model(num_hidden_layers=1, section_size=None, max_patch_summaries=1, retrieval_top_k=1,
                       retrieval_window=400)
    input_ids = torch.randint(4, 40, (1, 64), generator=torch.Generator().manual_seed(1))
    far = range(64 - 6 - 4)  # positions of the patches that lie wholly before the window and the summary's patch

    def reached(training: bool) -> set[int]:
        embeds = model.model.embed_tokens(input_ids).detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(model.train(training)(inputs_embeds=embeds).logits[0, -1].sum(), embeds)
        return {s // 4 for s in far if grad[0, s].abs().max() > 0}

    assert len(reached(False)) == 1
    assert reached(True) == {s // 4 for s in far}


@pytest.mark.parametrize(
    "options",
    [dict(section_size=2), dict(section_size=None), dict(retrieval_softmax="joint", retrieval_shared_choice=True),
     dict(retrieval_softmax="gated"), dict(retrieval_softmax="joint", retrieval_choice_query=True)],
)
def test_one_call_equals_segments_equals_token_by_token(margins, options):
    """90 tokens: past the window (6), the summaries and the retrieval window (24); the rows' top-k choices have a
    score margin far above float noise, so every chunking selects the same patches."""
    model = tiny_model(**options)
    input_ids = torch.randint(4, 40, (2, 90))
    with torch.no_grad():
        reference = model(input_ids, use_cache=False).logits
        for sizes in ([1], [3], [4], [11], [5, 1, 13], [90]):
            torch.testing.assert_close(run_segments(model, input_ids, sizes), reference, atol=1e-5, rtol=1e-5)
        off = tiny_model(**(options | dict(retrieval_top_k=0, retrieval_choice_query=False)))
        no_retrieval = off(input_ids, use_cache=False).logits
    assert min(margins) > 1e-4, "a near-tie of patch scores: pick other inputs"
    assert (reference - no_retrieval).abs().max() > 1e-2  # retrieval is really on


def test_left_padded_batch_gives_each_row_its_own_logits():
    assert_left_padded_rows_match_rows_alone(tiny_model(), (45, 9, 1), continuation=30)


@pytest.mark.parametrize(
    "options",
    [dict(do_sample=False), dict(do_sample=True, top_k=20), dict(num_beams=3, do_sample=False)],
    ids=["greedy", "sampling", "beam"],
)
def test_cached_and_uncached_generation_agree(options):
    model = tiny_model()
    prompts = torch.randint(4, 40, (2, 9))
    mask = torch.ones_like(prompts)
    mask[1, :4] = 0  # left padding
    torch.manual_seed(1)
    cached = model.generate(prompts, attention_mask=mask, max_new_tokens=50, use_cache=True, **options)
    torch.manual_seed(1)
    uncached = model.generate(prompts, attention_mask=mask, max_new_tokens=50, use_cache=False, **options)
    assert torch.equal(cached, uncached)


def test_cache_bytes_are_fixed_by_the_config_over_a_long_generation():
    model = tiny_model(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    config = model.config
    first = model.generate(torch.tensor([[1]]), max_new_tokens=10, do_sample=True, return_dict_in_generate=True)
    size = first.cache.nbytes()
    slots = (config.retrieval_window - 1) + config.summary_memory + config.section_memory
    assert size == 2 * slots * config.hidden_size * 4 + (2 + config.hidden_size) * 4 + 8 + 1  # k/v, pooling, rows
    output = model.generate(first.sequences, cache=first.cache, max_new_tokens=600, do_sample=True,
                            return_dict_in_generate=True)  # 25x the retrieval window
    assert output.cache.nbytes() == size and output.cache.seen.item() > 600


def test_decode_step_writes_the_ring_in_place_and_touches_one_token_slot():
    """The retrieval-window memory is a ring buffer written in place: a decode step keeps every cached tensor (same
    storage) and changes exactly one token slot per row and layer (slot = position mod slots), however large the
    retrieval window: no O(retrieval_window) copy per token."""
    model = tiny_model(retrieval_window=64)
    input_ids = torch.randint(4, 40, (2, 101))
    with torch.no_grad():
        cache = model(input_ids[:, :100], use_cache=True).cache
        before = {name: (tensor.data_ptr(), tensor.clone()) for name, tensor in cache.state_dict().items()
                  if name.endswith((".keys", ".values"))}
        model(input_ids[:, 100:], cache=cache, use_cache=True)
    after = cache.state_dict()
    slots = model.config.token_memory
    for name, (pointer, old) in before.items():
        assert after[name].data_ptr() == pointer, name
        changed = (after[name] != old).any(dim=(1, 3))  # [B, slots]: the slots this step wrote
        if ".tokens." in name:
            assert changed.sum(1).tolist() == [1, 1] and changed[:, 100 % slots].all(), name
        else:  # position 100 completes no patch (patch_size 4: patch 24 ends at 99, done in the prefill)
            assert not changed.any(), name


def test_gradients_flow_across_segments_through_the_ring_without_detaching():
    """Without `detached()` between segments, the second segment's loss reaches the first segment's inputs through
    the ring (which autograd still needs: it is then written out of place)."""
    model = tiny_model()
    embeds = model.model.embed_tokens(torch.randint(4, 40, (1, 30))).detach().requires_grad_(True)
    cache = HierarchicalXLCache(model.config)
    first = model(inputs_embeds=embeds[:, :20], cache=cache, use_cache=True).logits
    second = model(inputs_embeds=embeds[:, 20:], cache=cache, use_cache=True).logits
    (grad,) = torch.autograd.grad(second.sum(), embeds, retain_graph=True)
    assert grad[:, :20].abs().max() > 0 and first.requires_grad


@pytest.mark.parametrize("reading", ["grouped", "gated"])
def test_training_through_a_detached_ring_trains_every_segment(reading):
    """Truncated BPTT as the stream trainer runs it: a training forward reads the ring's summaries as they lie (a view
    autograd keeps for the backward), then stores the segment's entries: the backward still runs and every
    segment's loss reaches the weights; under no_grad the same forward writes the ring in place."""
    model = tiny_model(retrieval_softmax=reading).train()
    input_ids = torch.randint(4, 40, (2, 96))
    cache = HierarchicalXLCache(model.config)
    for segment in input_ids.split(32, dim=1):
        model.zero_grad()
        loss = model(segment, labels=segment, cache=cache, use_cache=True).loss
        loss.backward()
        assert torch.isfinite(loss) and model.model.layers[0].self_attn.q_proj.weight.grad.abs().max() > 0
        cache = cache.detached()
    ring = cache.layers[0].cached("patches")[0]
    with torch.no_grad():
        model(input_ids[:, :8], cache=cache, use_cache=True)
    assert cache.layers[0].cached("patches")[0].data_ptr() == ring.data_ptr()


def test_cache_state_round_trips_and_layout_is_checked(tmp_path):
    model = tiny_model()
    input_ids = torch.randint(4, 40, (2, 50))
    with torch.no_grad():
        cache = model(input_ids[:, :37], use_cache=True).cache
        save_file({name: tensor.contiguous() for name, tensor in cache.state_dict().items()}, tmp_path / "c.safetensors")
        restored = HierarchicalXLCache(model.config)
        restored.load_state_dict(load_file(tmp_path / "c.safetensors"))
        torch.testing.assert_close(model(input_ids[:, 37:], cache=restored).logits,
                                   model(input_ids[:, 37:], cache=cache).logits, atol=0, rtol=0)
    other = tiny_model(retrieval_top_k=0)
    with pytest.raises(ValueError, match="retrieval_window"):
        other(input_ids, cache=HierarchicalXLCache(model.config))
    with pytest.raises(ValueError, match="retrieval_window"):
        HierarchicalXLCache(other.config).load_state_dict(load_file(tmp_path / "c.safetensors"))
    sliding = load_file(tmp_path / "c.safetensors")  # a state of the older sliding-buffer layout: refused by name
    del sliding["layout.ring_buffer"]
    with pytest.raises(ValueError, match="ring_buffer"):
        HierarchicalXLCache(model.config).load_state_dict(sliding)


def test_save_load_and_remote_code_keep_retrieval(tmp_path):
    model = tiny_model(vocab_size=260)
    model.save_pretrained(tmp_path)
    input_ids = torch.randint(4, 260, (1, 70))
    with torch.no_grad():
        expected = model.generate(input_ids[:, :30], max_new_tokens=20, do_sample=False)
        logits = model(input_ids).logits
    loaded = HierarchicalXLForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.retrieval_top_k == 2 and loaded.config.retrieval_window == 24
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids).logits, logits, atol=0, rtol=0)
    stdout = run_without_package(
        f"""
        import json, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
        model.generation_config.eos_token_id = None
        output = model.generate(torch.tensor({input_ids[:, :30].tolist()}), max_new_tokens=20, do_sample=False)
        print(json.dumps({{"module": type(model).__module__, "top_k": model.config.retrieval_top_k,
                          "tokens": output.tolist()}}))
        """
    )
    result = last_json_line(stdout)
    assert not result["module"].startswith("hier_transformers") and result["top_k"] == 2
    assert result["tokens"] == expected.tolist()


def test_gated_retrieval_starts_as_the_model_without_it_and_loads_its_checkpoint(tmp_path):
    """`retrieval_softmax="gated"`: a checkpoint trained without retrieval loads with it switched on (from_pretrained
    and the trainers' init_from), reads exactly as before, and the gate learns; a gated checkpoint round-trips."""
    from training_utils import REPO_ROOT  # noqa: F401  puts the repository root on sys.path

    from training.common import load_initial_weights

    off = tiny_model(retrieval_top_k=0, vocab_size=260)
    off.save_pretrained(tmp_path / "off")
    gated = dict(retrieval_top_k=2, retrieval_window=24, retrieval_softmax="gated")
    on = HierarchicalXLForCausalLM.from_pretrained(tmp_path / "off", **gated).eval()
    fresh = HierarchicalXLForCausalLM(HierarchicalXLConfig(**(BASE | RETRIEVAL | gated | dict(vocab_size=260))))
    load_initial_weights(fresh, str(tmp_path / "off"))
    input_ids = torch.randint(4, 260, (2, 70))  # far past the window: every late query has far patches to read
    with torch.no_grad():
        expected = off(input_ids).logits
        torch.testing.assert_close(on(input_ids).logits, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fresh.eval()(input_ids).logits, expected, atol=1e-5, rtol=1e-5)
    fresh.train()(input_ids, labels=input_ids).loss.backward()
    assert all(layer.self_attn.retrieval_gate.grad.abs().max() > 0 for layer in fresh.model.layers)

    open_retrieval_gates(on).save_pretrained(tmp_path / "on")
    loaded = HierarchicalXLForCausalLM.from_pretrained(tmp_path / "on").eval()
    with torch.no_grad():
        logits = on(input_ids).logits
        assert (logits - expected).abs().max() > 1e-2  # the opened branch is really read
        torch.testing.assert_close(loaded(input_ids).logits, logits, atol=0, rtol=0)


# ------------------------------------------------------------------------------------- passkey benchmark plumbing


@pytest.fixture(scope="module")
def passkey():
    from training_utils import REPO_ROOT  # noqa: F401  puts the repository root on sys.path

    from training import passkey

    return passkey


def test_passkey_prompt_is_the_papers_with_the_key_at_the_distance(passkey):
    import random

    haystack = "abc defg hij. " * 50
    for distance in (64, 1000):
        prompt, actual = passkey.build_prompt("68048", distance, haystack, random.Random(0))
        sentence = "The pass key is 68048. Remember it. 68048 is the pass key.\n"
        assert prompt.startswith("There is an important info hidden inside a lot of irrelevant text. Find it and "
                                 "memorize them. I will quiz you about the important information there.\n")
        assert prompt.endswith("\nWhat is the pass key? The pass key is") and prompt.count("68048") == 2
        assert actual == distance and prompt.index("\nWhat is the pass key?") - prompt.index(sentence) == distance
        assert len(prompt.encode()) == len(prompt)  # ASCII haystack: characters are bytes
    assert passkey.score_answer(" 68048.", "68048") == (True, 1.0)
    assert passkey.score_answer(" 68041 and", "68048") == (False, 0.8)
    assert passkey.score_answer(" six", "68048") == (False, 0.0)


def test_passkey_benchmark_scores_exact_match_and_writes_json(passkey, tmp_path, monkeypatch):
    import json

    from hier_transformers import ByteTokenizer

    model = tiny_model(vocab_size=260)
    model.save_pretrained(tmp_path / "model")
    ByteTokenizer().save_pretrained(tmp_path / "model")
    monkeypatch.setattr(passkey, "load_haystack", lambda corpus, split: "Some held-out text. " * 40)
    truth = iter([True, False, True, True] * 4)  # an oracle that reads the key from the prompt, wrong when told

    def oracle(model, tokenizer, prompt, new_tokens, chunk):
        key = prompt.split("The pass key is ")[1][:5]
        assert new_tokens == 7 and prompt.endswith("The pass key is")  # " 68048" is 6 bytes, + 1
        return f" {key}." if next(truth) else f" {int(key) - 1}."

    monkeypatch.setattr(passkey, "greedy_answer", oracle)
    output = tmp_path / "passkey.json"
    passkey.main([str(tmp_path / "model"), "--distances", "100", "300", "--trials", "2", "--output", str(output)])
    results = json.loads(output.read_text())["results"]
    on, off = results.values()  # the checkpoint with retrieval on, then the same weights with it off
    assert [on["100"]["exact_match"], on["300"]["exact_match"], off["100"]["exact_match"]] == [0.5, 1.0, 0.5]
    assert list(results)[1].endswith("retrieval off)") and model.config.retrieval_top_k == 2


def test_passkey_read_time_flags_reach_the_model_and_are_validated(passkey, tmp_path, monkeypatch):
    """--retrieval-recency and --retrieval-top-k set the loaded model's config for every trial, land in the JSON, and
    an impossible value is refused by the config's own check, by name."""
    import json

    from hier_transformers import ByteTokenizer

    tiny_model(vocab_size=260).save_pretrained(tmp_path / "model")
    ByteTokenizer().save_pretrained(tmp_path / "model")
    monkeypatch.setattr(passkey, "load_haystack", lambda corpus, split: "Some held-out text. " * 40)
    seen = []

    def oracle(model, tokenizer, prompt, new_tokens, chunk):
        seen.append((model.config.retrieval_recency, model.config.retrieval_top_k))
        return " " + prompt.split("The pass key is ")[1][:5] + "."

    monkeypatch.setattr(passkey, "greedy_answer", oracle)
    output = tmp_path / "passkey.json"
    passkey.main([str(tmp_path / "model"), "--distances", "100", "--trials", "2", "--no-ablation",
                  "--retrieval-recency", "1e-5", "--retrieval-top-k", "1", "--output", str(output)])
    summary = json.loads(output.read_text())
    assert seen == [(1e-5, 1), (1e-5, 1)] and (summary["retrieval_recency"], summary["retrieval_top_k"]) == (1e-5, 1)
    with pytest.raises(ValueError, match="retrieval_recency"):
        passkey.main([str(tmp_path / "model"), "--distances", "100", "--trials", "1", "--retrieval-recency", "-1"])
    with pytest.raises(ValueError, match="retrieval_top_k"):
        passkey.main([str(tmp_path / "model"), "--distances", "100", "--trials", "1", "--retrieval-top-k", "-2"])


def test_passkey_split_evaluation_scores_the_trials_of_one_long_run(passkey, tmp_path, monkeypatch):
    """--first-trial N scores exactly the prompts a longer run scores after its first N (same keys, same haystack
    offsets), so a 50-trial evaluation split across processes adds up to the one run; a negative N is refused."""
    import json

    from hier_transformers import ByteTokenizer

    tiny_model(vocab_size=260).save_pretrained(tmp_path / "model")
    ByteTokenizer().save_pretrained(tmp_path / "model")
    monkeypatch.setattr(passkey, "load_haystack", lambda corpus, split: "Some held-out text, long enough. " * 40)
    prompts = []

    def oracle(model, tokenizer, prompt, new_tokens, chunk):
        prompts.append(prompt)
        return " " + prompt.split("The pass key is ")[1][:5] + "."

    monkeypatch.setattr(passkey, "greedy_answer", oracle)
    args = [str(tmp_path / "model"), "--distances", "100", "300", "--no-ablation"]
    passkey.main(args + ["--trials", "5"])
    whole, prompts[:] = list(prompts), []
    output = tmp_path / "tail.json"
    passkey.main(args + ["--trials", "3", "--first-trial", "2", "--output", str(output)])
    assert prompts == whole[2:5] + whole[7:10] and len(set(whole)) == 10
    assert json.loads(output.read_text())["first_trial"] == 2
    with pytest.raises(SystemExit):
        passkey.main(args + ["--first-trial", "-1"])


def test_passkey_mistral_peer_gets_equal_cache_bytes_and_a_full_attention_twin(passkey, tmp_path, monkeypatch):
    """A Mistral baseline is scored with the sliding window that holds the HierarchicalXL model's cache bytes, and its
    same weights as a Llama (full attention up to its context): the Llama computes exactly what the Mistral does
    inside its window, and is refused past its context."""
    import json

    from transformers import MistralConfig, MistralForCausalLM

    from hier_transformers import ByteTokenizer

    model = tiny_model(vocab_size=260)
    model.save_pretrained(tmp_path / "model")
    torch.manual_seed(0)
    mistral = MistralForCausalLM(MistralConfig(vocab_size=260, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                                               max_position_embeddings=1000, sliding_window=64)).eval()
    mistral.save_pretrained(tmp_path / "mistral" / "final")
    for folder in (tmp_path / "model", tmp_path / "mistral" / "final"):
        ByteTokenizer().save_pretrained(folder)
    twin = passkey.as_llama(mistral)
    ids = torch.randint(4, 260, (1, 60))
    with torch.no_grad():
        torch.testing.assert_close(twin(ids).logits, mistral(ids).logits, atol=1e-6, rtol=1e-6)
    monkeypatch.setattr(passkey, "load_haystack", lambda corpus, split: "Some held-out text. " * 40)
    windows = []

    def oracle(model, tokenizer, prompt, new_tokens, chunk):
        windows.append(getattr(model.config, "sliding_window", None))
        return " " + prompt.split("The pass key is ")[1][:5]

    monkeypatch.setattr(passkey, "greedy_answer", oracle)
    output = tmp_path / "passkey.json"
    passkey.main([str(tmp_path / "model"), "--baseline", str(tmp_path / "mistral" / "final"), "--distances", "100",
                  "1500", "--trials", "1", "--no-ablation", "--retrieval-window", "48", "--output", str(output)])
    results = json.loads(output.read_text())["results"]
    equal = passkey.cache_slots_per_layer(HierarchicalXLConfig(**(BASE | RETRIEVAL | dict(retrieval_window=48))))
    llama = next(name for name in results if "as llama" in name)
    assert results[llama]["100"]["exact_match"] == 1.0 and results[llama]["1500"]["exact_match"] is None  # > 1000
    assert results["mistral/final (mistral)"]["1500"]["exact_match"] == 1.0 and windows[-1] == equal
    passkey.main([str(tmp_path / "model"), "--only-baselines", "--baseline", str(tmp_path / "mistral" / "final"),
                  "--distances", "100", "--trials", "1", "--retrieval-window", "48", "--output", str(output)])
    peers = json.loads(output.read_text())["results"]
    assert len(peers) == 2 and all("hierarchical_xl" not in name for name in peers) and windows[-1] == equal


def test_passkey_greedy_answer_runs_a_real_model_in_chunks(passkey):
    from hier_transformers import ByteTokenizer

    model, tokenizer = tiny_model(vocab_size=260), ByteTokenizer()
    prompt = "There is a pass key 12345 " * 4
    one = passkey.greedy_answer(model, tokenizer, prompt, 6, chunk=1000)
    chunked = passkey.greedy_answer(model, tokenizer, prompt, 6, chunk=7)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    assert one == chunked == tokenizer.decode(expected[0, ids.shape[1] :], skip_special_tokens=True)


def test_passkey_training_data_holds_prompts_with_their_answers(passkey, tmp_path, monkeypatch):
    import json

    monkeypatch.setattr(passkey, "load_haystack", lambda corpus, split: "Training text here. " * 40)
    path = tmp_path / "train.jsonl"
    passkey.main(["--write-training-data", str(path), "--distances", "16", "64", "--documents", "60",
                  "--real-text-fraction", "0.25", "--drill-fraction", "0.25"])
    texts = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    keyed = [text for text in texts if text.startswith("There is an important info")]
    drills = [text for text in texts if text.startswith("The pass key is ")]
    assert len(texts) == 60 and 15 < len(keyed) < 45 and 5 < len(drills) < 30
    for text in keyed:
        key = text.split("The pass key is ")[1][:5]
        assert text.endswith(f"What is the pass key? The pass key is {key}.")
    for text in drills:  # key sentences back to back, each with its own fresh key
        keys = [line.split("The pass key is ")[1][:5] for line in text.splitlines()]
        assert len(keys) == passkey.DRILL_SENTENCES and all(line.count(key) == 2 for line, key in
                                                            zip(text.splitlines(), keys))
    with pytest.raises(SystemExit):  # no room left for passkey documents
        passkey.main(["--write-training-data", str(path), "--real-text-fraction", "0.5", "--drill-fraction", "0.5"])


def test_passkey_training_distances_follow_the_given_weights(passkey, tmp_path, monkeypatch):
    """--distance-weights draws each distance that often (a zero weight never); a weight per distance, or an error."""
    import json

    monkeypatch.setattr(passkey, "load_haystack", lambda corpus, split: "Training text here. " * 400)
    path = tmp_path / "train.jsonl"
    passkey.main(["--write-training-data", str(path), "--distances", "16", "64", "1024", "--distance-weights", "0", "1",
                  "3", "--documents", "200", "--real-text-fraction", "0"])
    prompts = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    distances = [text.index(passkey.QUESTION) - text.index("The pass key is ") for text in prompts]
    assert set(distances) == {64, 1024} and 0.6 < distances.count(1024) / len(distances) < 0.9  # 16 never, 1024: 3/4
    for weights in (["1", "1"], ["1", "-1", "1"], ["0", "0", "0"]):
        with pytest.raises(SystemExit):
            passkey.main(["--write-training-data", str(path), "--distances", "16", "64", "1024", "--distance-weights",
                          *weights])


def test_passkey_induction_drills_put_the_copy_at_varying_distances(passkey):
    """--drill-gap N: each fresh key is mentioned twice, "The pass key is K. " + 0..N haystack bytes + "The pass key is
    K.", so the copy's distance varies (no fixed offset finds it); 0 keeps the back-to-back key sentences."""
    import random

    haystack = "abcdefghij" * 20
    text = passkey.copy_drill(random.Random(0), sentences=200, gap=16, haystack=haystack)
    distances = set()
    for line in text.splitlines():
        first, second = line.split("The pass key is ")[1:]
        key = first[:5]
        assert key.isdigit() and second == f"{key}." and len(first) - len(f"{key}. ") <= 16
        distances.add(len(first))
    assert distances == set(range(7, 7 + 17))  # every gap of 0..16 occurs
    assert passkey.copy_drill(random.Random(0), sentences=3) == passkey.copy_drill(random.Random(0), sentences=3, gap=0)
    with pytest.raises(SystemExit):
        passkey.main(["--write-training-data", "x.jsonl", "--drill-gap", "-1"])


def test_passkey_string_drills_repeat_a_random_string_behind_haystack(passkey):
    """--drill-strings F: a fraction F of the induction pairs are "X <0..gap haystack bytes> X" for a random string X
    of 4..12 letters and digits (the dense copies induction forms on); the rest stay key sentences."""
    import random

    text = passkey.copy_drill(random.Random(0), sentences=400, gap=16, haystack="." * 50, strings=0.5)
    lines = text.splitlines()
    strings = [line for line in lines if not line.startswith("The pass key is ")]
    assert 150 < len(strings) < 250 and len({line.split(" ")[0] for line in strings}) == len(strings)
    for line in strings:
        first, gap, second = line.split(" ")
        assert first == second and 4 <= len(first) <= 12 and set(first) <= set(passkey.STRING_ALPHABET)
        assert set(gap) <= {"."} and len(gap) <= 16
    assert all(line.count("The pass key is ") == 2 for line in lines if line not in strings)
    with pytest.raises(SystemExit):  # random strings are induction pairs: they need a gap
        passkey.main(["--write-training-data", "x.jsonl", "--drill-fraction", "0.3", "--drill-strings", "0.5"])


def test_a_retrieved_patch_reads_the_same_at_any_distance():
    """Retrieval is position-free: a needle patch read from 3 or 60 patches back gives the same logits (the filler
    in between is one repeated patch, so window and summaries see the same thing), and it is really read (replacing
    the needle by filler changes them). One layer, no sections, top 1, retrieval window far past both distances."""
    model = tiny_model(num_hidden_layers=1, section_size=None, retrieval_top_k=1, retrieval_window=400)
    tail = [11, 12, 13, 14, 15, 16, 17, 18]

    def logits(needle: list[int], filler: list[int], gaps: int) -> torch.Tensor:
        ids = torch.tensor([needle + filler * gaps + tail])
        return model(ids, use_cache=False).logits[0, -1]

    with torch.no_grad():
        for needle, filler in torch.randint(4, 40, (40, 2, 4), generator=torch.Generator().manual_seed(0)).tolist():
            near, far, absent = logits(needle, filler, 3), logits(needle, filler, 60), logits(filler, filler, 60)
            if (far - absent).abs().max() > 1e-3:  # this needle outscores the filler: it is the patch read
                break
        else:
            pytest.fail("no needle outscored its filler patch")
        torch.testing.assert_close(near, far, atol=1e-5, rtol=1e-5)


def test_passkey_copy_loss_scores_exactly_the_second_mention_digits(passkey):
    """An oracle that knows every next byte scores 0; the same oracle, blind (uniform) on digits only, scores exactly
    ln(vocab): the loss reads the 5 digits of each second mention and nothing else."""
    import math
    from types import SimpleNamespace

    from hier_transformers import ByteTokenizer

    tokenizer = ByteTokenizer()
    digits = set(tokenizer("0123456789", add_special_tokens=False)["input_ids"])

    class Oracle(torch.nn.Module):
        def __init__(self, blind_on_digits: bool):
            super().__init__()
            self.blind = blind_on_digits
            self.device = torch.device("cpu")

        def forward(self, ids, **kwargs):
            logits = torch.zeros(1, ids.shape[1], 260)
            for t in range(ids.shape[1] - 1):
                following = int(ids[0, t + 1])
                if not (self.blind and following in digits):
                    logits[0, t, following] = 1e4
            return SimpleNamespace(logits=logits)

    assert passkey.copy_loss(Oracle(False), tokenizer, seed=0) == pytest.approx(0.0, abs=1e-6)
    assert passkey.copy_loss(Oracle(True), tokenizer, seed=0) == pytest.approx(math.log(260), rel=1e-6)
    haystack = "Plain words, no digits. " * 10  # induction drills: the copy behind 0..16 bytes of it
    assert passkey.copy_loss(Oracle(False), tokenizer, seed=0, gap=16, haystack=haystack) == pytest.approx(0.0, abs=1e-6)
    assert passkey.copy_loss(Oracle(True), tokenizer, seed=0, gap=16, haystack=haystack) == pytest.approx(
        math.log(260), rel=1e-6)


def test_passkey_selection_hits_see_which_patches_retrieval_chose(passkey):
    """With top_k >= every selectable patch, each answer query chooses the key's patches (hit rate 1 in every layer);
    with a retrieval window that ends before the key, never (0)."""
    from hier_transformers import ByteTokenizer

    haystack = "Some held-out text, nothing else. " * 30
    everything = tiny_model(vocab_size=260, retrieval_top_k=200, retrieval_window=1024)
    assert passkey.selection_hits(everything, ByteTokenizer(), 64, 2, haystack, seed=0) == [1.0, 1.0]
    short = tiny_model(vocab_size=260, retrieval_top_k=200, retrieval_window=24)
    assert passkey.selection_hits(short, ByteTokenizer(), 64, 2, haystack, seed=0) == [0.0, 0.0]


def test_passkey_digit_probe_reads_each_answer_digit_and_its_patch(passkey):
    """Teacher forced: a model that always predicts the next byte gets every digit (1.0), one blind on digits none
    (0.0); with top_k >= every selectable patch each digit's query chose that digit's patch in every layer (1.0),
    with a retrieval window that ends before the key never (0.0)."""
    from hier_transformers import ByteTokenizer

    tokenizer, haystack = ByteTokenizer(), "Some held-out text, nothing else. " * 30
    digits = set(tokenizer("0123456789", add_special_tokens=False)["input_ids"])

    class Oracle(torch.nn.Module):
        config = SimpleNamespace(model_type="llama", num_hidden_layers=1)

        def __init__(self, blind_on_digits: bool):
            super().__init__()
            self.blind, self.device = blind_on_digits, torch.device("cpu")

        def forward(self, ids, **kwargs):
            logits = torch.zeros(1, ids.shape[1], 260)
            for t in range(ids.shape[1] - 1):
                if not (self.blind and int(ids[0, t + 1]) in digits):
                    logits[0, t, int(ids[0, t + 1])] = 1e4
            return SimpleNamespace(logits=logits)

    assert passkey.digit_probe(Oracle(False), tokenizer, 64, 3, haystack, seed=0)["teacher_forced"] == [1.0] * 5
    assert passkey.digit_probe(Oracle(True), tokenizer, 64, 3, haystack, seed=0)["teacher_forced"] == [0.0] * 5
    everything = tiny_model(vocab_size=260, retrieval_top_k=200, retrieval_window=1024)
    probe = passkey.digit_probe(everything, tokenizer, 64, 2, haystack, seed=0)
    assert probe["target_patch_chosen"] == [[1.0] * 5] * 2 and len(probe["teacher_forced"]) == 5
    short = tiny_model(vocab_size=260, retrieval_top_k=200, retrieval_window=24)
    assert passkey.digit_probe(short, tokenizer, 64, 2, haystack, seed=0)["target_patch_chosen"] == [[0.0] * 5] * 2


def test_shared_choice_adds_the_first_layers_patches_to_every_later_layer(monkeypatch):
    """retrieval_shared_choice: a later layer reads the first layer's top k and its own, a patch both chose once."""
    read = []
    retrieve = HierarchicalXLAttention.retrieve

    def recording(self, *args):
        retrieved = retrieve(self, *args)
        read.append(retrieved.mask.any(-1)[:, 0])  # [N, q, patches]: which patch reads are real
        return retrieved

    monkeypatch.setattr(HierarchicalXLAttention, "retrieve", recording)
    input_ids = torch.randint(4, 40, (1, 60))
    with torch.no_grad():
        tiny_model(num_hidden_layers=3, retrieval_shared_choice=True)(input_ids, use_cache=False)
    first, second, third = read
    assert first.shape[-1] == 2 and second.shape[-1] == third.shape[-1] == 4  # top k, then 2 k slots
    assert (second.sum(-1) >= first.sum(-1)).all() and (second.sum(-1) <= 4).all()
    assert (second.sum(-1) > first.sum(-1)).any() and (second.sum(-1) < 4).any()  # own patches beside the first layer's; fewer where both chose one or fewer are selectable


def test_passkey_rows_are_named_by_run_and_folder(passkey):
    """A learning curve mixes training checkpoints and other runs' final weights: each row keeps its own name."""
    assert passkey.row_name("runs/xl/final") == "xl/final"
    assert passkey.row_name("runs/xl/final", "runs/xl/checkpoints/step_300/model.safetensors") == "xl/step_300"
    assert passkey.row_name("runs/b/final", "runs/a/final/model.safetensors") == "a/final"
    assert passkey.row_name("runs/b/final", "runs/b/final/model.safetensors") == "b/final"
