"""HierarchicalXL decoder: visibility rule, causality, exact recurrence, padding, attention backends, TBPTT."""

from __future__ import annotations

import pytest
import torch

from hier_transformers import HierarchicalXLCache, HierarchicalXLConfig, HierarchicalXLForCausalLM, segment_lm_step
from hier_transformers.modeling_blocks import apply_rotary


def tiny_config(**overrides) -> HierarchicalXLConfig:
    values = dict(
        vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        patch_size=4, local_window=6, max_patch_summaries=3, section_size=2, max_section_summaries=2,
    )
    return HierarchicalXLConfig(**(values | overrides))


def tiny_model(**overrides) -> HierarchicalXLForCausalLM:
    torch.manual_seed(0)
    return open_retrieval_gates(HierarchicalXLForCausalLM(tiny_config(**overrides)).eval())


def open_retrieval_gates(model: HierarchicalXLForCausalLM) -> HierarchicalXLForCausalLM:
    """Gated retrieval starts closed and the choice query at 0 (the model without them): draw them at random, so that
    they count."""
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.self_attn, "retrieval_gate"):
                layer.self_attn.retrieval_gate.normal_(0.0, 0.5)
                layer.self_attn.retrieval_gate_bias.fill_(1.0)
            if hasattr(layer.self_attn, "choice_query"):  # starts at 0 as well: the content query's choice
                layer.self_attn.choice_query.normal_(0.0, 0.3)
    return model


def run_segments(model, input_ids: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Logits of `input_ids` fed in consecutive chunks of the given sizes (cycled), cache carried."""
    cache, logits, start, step = HierarchicalXLCache(model.config), [], 0, 0
    while start < input_ids.shape[1]:
        size = sizes[step % len(sizes)]
        output = model(input_ids[:, start : start + size], cache=cache, use_cache=True)
        logits.append(output.logits)
        cache, start, step = output.cache, start + size, step + 1
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(patch_size=0), "patch_size"),
        (dict(local_window=2), "local_window"),
        (dict(section_size=1), "section_size"),
        (dict(max_section_summaries=0), "max_section_summaries"),
        (dict(hidden_size=30), "hidden_size"),
        (dict(attention_dropout=1.5), "attention_dropout"),
        (dict(max_patch_summaries=0), "max_patch_summaries"),
    ],
)
def test_config_rejects_invalid_values(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


def test_config_round_trips_every_knob(tmp_path):
    config = tiny_config(section_size=None, rope_theta=500.0, tie_word_embeddings=False)
    config.save_pretrained(tmp_path)
    loaded = HierarchicalXLConfig.from_pretrained(tmp_path)
    knobs = ("patch_size", "local_window", "max_patch_summaries", "section_size", "rope_theta", "tie_word_embeddings")
    for name in knobs:
        assert getattr(loaded, name) == getattr(config, name)
    assert loaded.patch_memory == 3 and loaded.section_memory == 0


def dense_reference(model: HierarchicalXLForCausalLM, input_ids: torch.Tensor) -> torch.Tensor:
    """Output of the first layer written query by query straight from the rule: tokens t - W < s <= t; patch j
    (complete iff (j + 1) P <= t) visible among the most recent; older ones folded into sections of Q patches (mean of
    their summaries) once all Q are older than the M most recent; MS sections. Retrieval (top_k K > 0): of the patches
    j with t - R < j P <= t - W, the K with the highest score (per head the softmax over them of the content logit,
    query . summary key before RoPE * scaling - retrieval_recency per patch of age, summed over heads; ties to the
    older patch); their tokens outside the window join the softmax re-rotated to sit in the P positions right before
    the window, each patch weighing as one key whose logit is its content logit (token logit - logsumexp of its
    patch's + content logit; `retrieval_softmax="joint"`: each token one key of its own logit). In training mode every other selectable patch joins as one key of its content
    logit with its summary value. `retrieval_softmax="gated"`: the retrieved tokens (each by its own logit) and the
    other selectable patches' summaries (in eval too) form a softmax of their own, added per head times the gate."""
    config, layer = model.config, model.model.layers[0]
    attn = layer.self_attn
    P, W, M, Q, MS = (config.patch_size, config.local_window, config.max_patch_summaries, config.section_size,
                      config.max_section_summaries)
    hidden = model.model.embed_tokens(input_ids)  # [1, N, H]
    N = hidden.shape[1]
    x = layer.input_layernorm(hidden)
    rotary = model.model.rotary_emb
    cos, sin = rotary(torch.arange(N), x.dtype)
    q_raw, k_raw, v = attn.project(x)
    if config.key_shift:  # k_t + w * k_(t-1), before RoPE
        k_raw = k_raw + attn.key_shift * torch.nn.functional.pad(k_raw, (0, 0, 1, 0))[:, :, :-1]
    q, k = apply_rotary(q_raw, cos, sin), apply_rotary(k_raw, cos, sin)
    n_patches = N // P
    members = x[:, : n_patches * P].reshape(1, n_patches, P, -1)
    pooled, _ = attn.pooling(members, torch.ones(1, n_patches, P, dtype=torch.bool))
    patch_cos, patch_sin = rotary(torch.arange(1, n_patches + 1) * P - 1, x.dtype)
    pk_raw = attn.split_heads(attn.k_proj(pooled))
    pk = apply_rotary(pk_raw, patch_cos, patch_sin)
    pv = attn.split_heads(attn.v_proj(pooled))
    n_sections = n_patches // Q
    sk = pk[:, :, : n_sections * Q].unflatten(2, (n_sections, Q)).mean(3)
    sv = pv[:, :, : n_sections * Q].unflatten(2, (n_sections, Q)).mean(3)
    keys, values = torch.cat([k, pk, sk], 2)[0], torch.cat([v, pv, sv], 2)[0]  # [h, K, d]
    outputs = []
    for t in range(N):
        complete = [j for j in range(n_patches) if (j + 1) * P <= t]
        folded = max(len(complete) - M, 0) // Q  # sections whose patches all left the M most recent
        visible = [s for s in range(N) if t - W < s <= t] + [N + j for j in complete if j >= folded * Q]
        visible += [N + n_patches + section for section in range(folded) if section >= folded - MS]
        key, value, bias = keys[:, visible], values[:, visible], torch.zeros(q.shape[1], len(visible))
        gated = config.retrieval_softmax == "gated"
        near = len(visible)  # gated: the keys after these are the far branch's
        selectable = [j for j in range(n_patches) if t - config.retrieval_window < j * P <= t - W]
        if config.retrieval_top_k and selectable:
            content = torch.einsum("hd,hjd->hj", q_raw[0, :, t], pk_raw[0][:, selectable])
            ages = torch.tensor([t // P - j for j in selectable])
            scores = torch.softmax(content * attn.scaling - config.retrieval_recency * ages, dim=1).sum(0).log()
            ranked = sorted(range(len(selectable)), key=lambda i: (-scores[i].item(), selectable[i]))
            chosen = ranked[: config.retrieval_top_k]
            for i in ranked[config.retrieval_top_k :] if model.training or gated else []:  # one key: its summary
                key = torch.cat([key, torch.zeros_like(key[:, :1])], 1)
                value = torch.cat([value, pv[0][:, selectable[i] : selectable[i] + 1]], 1)
                bias = torch.cat([bias, content[:, i : i + 1] * attn.scaling], 1)
            for i in sorted(chosen, key=lambda i: selectable[i]):
                j = selectable[i]
                far = [s for s in range(j * P, (j + 1) * P) if s <= t - W]  # the window's are already in
                placed = torch.tensor([t - W + 1 - P + s - j * P for s in far])  # the P positions before the window
                far_cos, far_sin = rotary(placed, x.dtype)
                far_keys = apply_rotary(k_raw[0][:, far], far_cos, far_sin)
                logits = torch.einsum("hd,hkd->hk", q[0, :, t], far_keys) * attn.scaling
                gate = content[:, i : i + 1] * attn.scaling  # the patch weighs as one key of this logit
                # grouped: added to the bias, so that (q . key) * scaling + bias = logits - logsumexp(logits) + gate;
                # joint: each token is one key of its own logit
                grouped = (gate - logits.logsumexp(1, keepdim=True)).expand(-1, len(far))
                bias = torch.cat([bias, grouped if config.retrieval_softmax == "grouped" else 0 * grouped], 1)
                key = torch.cat([key, far_keys], 1)
                value = torch.cat([value, v[0][:, far]], 1)
        logits = torch.einsum("hd,hkd->hk", q[0, :, t], key) * attn.scaling + bias
        if not gated:
            outputs.append(torch.einsum("hk,hkd->hd", torch.softmax(logits, dim=-1), value).flatten())
            continue
        output = torch.einsum("hk,hkd->hd", torch.softmax(logits[:, :near], dim=-1), value[:, :near])
        if logits.shape[1] > near:  # the far branch, through the gate of this token
            far_output = torch.einsum("hk,hkd->hd", torch.softmax(logits[:, near:], dim=-1), value[:, near:])
            output = output + (attn.retrieval_gate @ x[0, t] + attn.retrieval_gate_bias)[:, None] * far_output
        outputs.append(output.flatten())
    hidden = hidden + attn.o_proj(torch.stack(outputs)[None])
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


def shifted_model(**overrides) -> HierarchicalXLForCausalLM:
    """A tiny model with `key_shift` on and its (zero-initialised) shift weights drawn at random."""
    model = tiny_model(key_shift=True, **overrides)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.key_shift.normal_(0.0, 0.5)
    return model


@pytest.mark.parametrize("key_shift", [False, True])
@pytest.mark.parametrize("retrieval", [{}, dict(retrieval_top_k=2, retrieval_window=20, initializer_range=0.3),
                                       dict(retrieval_top_k=2, retrieval_window=20, initializer_range=0.3,
                                            retrieval_softmax="joint"),
                                       dict(retrieval_top_k=2, retrieval_window=20, initializer_range=0.3,
                                            retrieval_softmax="gated")])
@pytest.mark.parametrize("length", [23, 64])
@pytest.mark.parametrize("training", [False, True])
def test_block_local_forward_equals_dense_rule(length, retrieval, key_shift, training):
    """In eval each query reads its top k far patches; in training (dropout 0) also the summaries of the others."""
    model = (shifted_model if key_shift else tiny_model)(num_hidden_layers=1, **retrieval).train(training)
    input_ids = torch.randint(4, 40, (1, length))
    with torch.no_grad():
        ours = model(input_ids, use_cache=False, output_hidden_states=True).hidden_states[1]
        torch.testing.assert_close(ours, dense_reference(model, input_ids), atol=1e-5, rtol=1e-5)
        cached = model.model(input_ids[:, :7], use_cache=True)
        rest = model.model(input_ids[:, 7:], cache=cached.cache, output_hidden_states=True).hidden_states[1]
        torch.testing.assert_close(rest, dense_reference(model, input_ids)[:, 7:], atol=1e-5, rtol=1e-5)


def test_causality_gradients_never_flow_from_the_future():
    model = tiny_model()
    embeds = model.model.embed_tokens(torch.randint(4, 40, (1, 40))).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeds, use_cache=False).logits
    for t in (0, 3, 4, 7, 8, 21, 38):  # around patch (4) and section (8) boundaries
        (grad,) = torch.autograd.grad(logits[0, t].sum(), embeds, retain_graph=True)
        assert grad[0, t + 1 :].abs().max() == 0
        assert grad[0, t].abs().max() > 0


def test_causality_perturbing_future_tokens_keeps_past_logits():
    model = tiny_model()
    input_ids = torch.randint(4, 40, (2, 50))
    with torch.no_grad():
        reference = model(input_ids, use_cache=False).logits
        for t in (0, 5, 11, 12, 30):
            for k in (1, 4, 9):
                if t + k >= 50:
                    continue
                changed = input_ids.clone()
                changed[:, t + k] = (changed[:, t + k] + 7) % 36 + 4
                one_call = model(changed, use_cache=False).logits
                torch.testing.assert_close(one_call[:, : t + 1], reference[:, : t + 1], atol=0, rtol=0)
                segmented = run_segments(model, changed, [3, 5])
                torch.testing.assert_close(segmented[:, : t + 1], reference[:, : t + 1], atol=1e-5, rtol=1e-5)


def test_summary_becomes_visible_only_when_its_patch_completes():
    """A token far outside the window reaches position t only through its patch summary, from (j + 1) * P on."""
    model = tiny_model(num_hidden_layers=1, local_window=4, max_patch_summaries=8, section_size=None)
    embeds = model.model.embed_tokens(torch.randint(4, 40, (1, 24))).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeds, use_cache=False).logits
    source = 1  # in patch 0 = positions 0..3, outside the 4-token window from t >= 5
    for t in range(5, 24):
        (grad,) = torch.autograd.grad(logits[0, t].sum(), embeds, retain_graph=True)
        assert (grad[0, source].abs().max() > 0) == (t >= 4), t


@pytest.mark.parametrize("section_size", [2, None])
@pytest.mark.parametrize("length", [20, 90])  # 90 tokens: far past every bound (window 6, 3 patches, 2 sections)
def test_one_call_equals_segments_equals_token_by_token(section_size, length):
    model = tiny_model(section_size=section_size)
    input_ids = torch.randint(4, 40, (2, length))
    P = model.config.patch_size
    with torch.no_grad():
        reference = model(input_ids, use_cache=False).logits
        for sizes in ([1], [P - 1], [P], [2 * P + 3], [5, 1, 13], [length]):
            torch.testing.assert_close(run_segments(model, input_ids, sizes), reference, atol=1e-5, rtol=1e-5)


def test_eager_equals_sdpa():
    model = tiny_model()
    input_ids = torch.randint(4, 40, (2, 45))
    with torch.no_grad():
        sdpa = model(input_ids, use_cache=False).logits
        model.set_attn_implementation("eager")
        eager = model(input_ids, use_cache=False).logits
    assert model.config._attn_implementation == "eager"
    torch.testing.assert_close(eager, sdpa, atol=1e-5, rtol=1e-5)


def assert_left_padded_rows_match_rows_alone(model, lengths: tuple[int, ...], continuation: int) -> None:
    """A left-padded batch, and its continuation through the cache, give each row the logits it has alone."""
    rows = [torch.randint(4, 40, (n,)) for n in lengths]
    width = max(len(row) for row in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :], attention_mask[i, width - len(row) :] = row, 1
    with torch.no_grad():
        batch = model(input_ids, attention_mask=attention_mask, use_cache=True)
        more = torch.randint(4, 40, (len(rows), continuation))
        continued = model(more, attention_mask=torch.cat([attention_mask, torch.ones_like(more)], 1), cache=batch.cache)
        for i, row in enumerate(rows):
            alone = model(torch.cat([row, more[i]])[None], use_cache=False).logits[0]
            torch.testing.assert_close(batch.logits[i, width - len(row) :], alone[: len(row)], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(continued.logits[i], alone[len(row) :], atol=1e-5, rtol=1e-5)


def test_left_padded_batch_gives_each_row_its_own_logits():
    assert_left_padded_rows_match_rows_alone(tiny_model(), (31, 9, 1), continuation=6)


def test_right_padding_is_fine_in_one_call_but_cannot_be_continued():
    model = tiny_model()
    input_ids = torch.randint(4, 40, (2, 20))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 13:] = 0
    with torch.no_grad():
        output = model(input_ids, attention_mask=attention_mask, use_cache=True)
        alone = model(input_ids[1:, :13], use_cache=False).logits
        torch.testing.assert_close(output.logits[1, :13], alone[0], atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="padding_side = 'left'"):
            model(input_ids[:, :1], cache=output.cache)
        holes = attention_mask.clone()
        holes[0, 5] = 0
        with pytest.raises(ValueError, match="padding between real tokens"):
            model(input_ids, attention_mask=holes)


def test_bad_inputs_raise_clear_errors():
    model = tiny_model()
    input_ids = torch.randint(4, 40, (2, 10))
    with pytest.raises(ValueError, match="exactly one of `input_ids` or `inputs_embeds`"):
        model(input_ids=input_ids, inputs_embeds=model.model.embed_tokens(input_ids))
    with pytest.raises(ValueError, match="attention_mask"):
        model(input_ids, attention_mask=torch.ones(2, 7))
    cache = model(input_ids, use_cache=True).cache
    with pytest.raises(ValueError, match="batch size"):
        model(input_ids[:1], cache=cache)
    with pytest.raises(ValueError, match="cannot remove tokens"):
        cache.crop(-1)


def test_cache_batch_operations_follow_the_rows():
    model = tiny_model()
    input_ids = torch.randint(4, 40, (2, 17))
    more = torch.randint(4, 40, (2, 5))
    with torch.no_grad():
        cache = model(input_ids, use_cache=True).cache
        cache.batch_repeat_interleave(2)  # rows 0, 0, 1, 1
        cache.reorder_cache(torch.tensor([3, 0, 2, 1]))  # rows 1, 0, 1, 0
        cache.batch_select_indices(torch.tensor([0, 1]))  # rows 1, 0
        swapped = model(more.flip(0), cache=cache).logits
        reference = model(torch.cat([input_ids, more], 1), use_cache=False).logits[:, 17:]
    torch.testing.assert_close(swapped, reference.flip(0), atol=1e-5, rtol=1e-5)
    assert cache.get_seq_length() == 22 and cache.seen.tolist() == [22, 22]


def test_segment_lm_step_gradients_match_explicit_detached_segments():
    model = tiny_model()
    model.train()
    input_ids = torch.randint(4, 40, (2, 37))
    loss_sum, n_tokens, cache = segment_lm_step(model, input_ids, segment_length=10, backward=torch.Tensor.backward)
    ours = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    # explicit: each segment's memory built WITHOUT gradient by a one-call forward of its prefix
    targets = input_ids[:, 1:]
    for start in range(0, 37, 10):
        prefix_cache = HierarchicalXLCache(model.config)
        if start:
            with torch.no_grad():
                model(input_ids[:, :start], cache=prefix_cache, use_cache=True)
        logits = model(input_ids[:, start : start + 10], cache=prefix_cache, use_cache=True).logits
        segment_targets = targets[:, start : start + 10]
        logits = logits[:, : segment_targets.shape[1]]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 40), segment_targets.reshape(-1), reduction="sum")
        (loss / targets.numel()).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, atol=1e-6, rtol=1e-4, msg=name)
    with torch.no_grad():
        full = model(input_ids, labels=input_ids, use_cache=False).loss
    assert n_tokens == 72 and cache.seen.tolist() == [37, 37]
    torch.testing.assert_close(loss_sum / n_tokens, full, atol=1e-5, rtol=1e-5)
    assert all(not tensor.requires_grad for tensor in cache.state_dict().values())


# ------------------------------------------------------------------------------------------------------ key_shift


def test_key_shift_starts_as_the_model_without_it():
    """key_shift=True adds one zero-initialised weight per key channel: same logits as without it until trained;
    the cache then also carries each layer's last key (and says so in its layout)."""
    plain, shifted = tiny_model(), tiny_model(key_shift=True)
    input_ids = torch.randint(4, 40, (2, 40))
    with torch.no_grad():
        first, second = plain(input_ids, use_cache=True), shifted(input_ids, use_cache=True)
    torch.testing.assert_close(first.logits, second.logits, atol=0, rtol=0)
    assert "layers.0.last_key" in second.cache.state_dict() and "layers.0.last_key" not in first.cache.state_dict()
    with pytest.raises(ValueError, match="key_shift"):
        shifted(input_ids, cache=first.cache)
    with pytest.raises(ValueError, match="key_shift"):
        tiny_config(key_shift=1)


@pytest.mark.parametrize("retrieval", [{}, dict(retrieval_top_k=2, retrieval_window=24, initializer_range=0.3)])
def test_key_shift_one_call_equals_segments_padding_and_generation(retrieval):
    """The shifted key of a chunk's first token reads the cached last key: any chunking, left padding, a reset row
    and cached generation give the logits of one uncached call."""
    model = shifted_model(**retrieval)
    model.generation_config.eos_token_id = None
    input_ids = torch.randint(4, 40, (2, 70))
    with torch.no_grad():
        reference = model(input_ids, use_cache=False).logits
        for sizes in ([1], [3], [5, 1, 13]):
            torch.testing.assert_close(run_segments(model, input_ids, sizes), reference, atol=1e-5, rtol=1e-5)
        assert (reference - tiny_model(**retrieval)(input_ids, use_cache=False).logits).abs().max() > 1e-4  # on
        cache = model(input_ids[:, :30], use_cache=True).cache
        cache.reset_rows(torch.tensor([True, False]))  # row 0 starts a new document
        torch.testing.assert_close(model(input_ids[:, 30:], cache=cache).logits[0],
                                   model(input_ids[:1, 30:], use_cache=False).logits[0], atol=1e-5, rtol=1e-5)
    assert_left_padded_rows_match_rows_alone(model, (31, 9, 1), continuation=6)
    prompts = input_ids[:, :9]
    for options in (dict(do_sample=False), dict(num_beams=3, do_sample=False)):
        cached = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=20, use_cache=True,
                                **options)
        uncached = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=20,
                                  use_cache=False, **options)
        assert torch.equal(cached, uncached)
