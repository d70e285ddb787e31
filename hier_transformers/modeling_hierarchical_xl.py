"""HierarchicalXL: a Transformer-XL-style causal LM whose memory is hierarchical.

Every layer lets the token at position `t` attend to the recent tokens `t - local_window < s <= t` at full resolution,
to summaries (attention pooling) of completed earlier patches, and optionally to section summaries that fold older
patches. The rule is a pure function of positions (`visible_ranges`), used by the one-call forward and by the cached
(segment-by-segment or token-by-token) path alike, so all of them give the same logits.

With `retrieval_top_k > 0` each query also reads, at full resolution, the tokens of the few far patches whose summary
scores it highest (coarse-to-fine retrieval, the selection branch of Native Sparse Attention): the summaries say where
to look, the tokens give the exact bytes back. Which patches may be chosen is again a function of positions only
(`visible_ranges(...)["selectable"]`); which are chosen is a function of those plus content scores (no RoPE), and the
chosen tokens are read as if they sat right before the window, so nothing about retrieval depends on the distance.
Each chosen patch weighs as one key of its score (Landmark Attention's grouped softmax); in training the unchosen
selectable patches also join, as their summaries (Native Sparse Attention's compressed branch), so every score that
chooses learns from the loss.

The one-call forward is block-local: queries are processed in blocks, each block gathers only the keys it may see
(a window of tokens plus a window of summaries), so the cost is O(N * (window + summaries)), never an N x N mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import initialization as init
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel, slice_logits_to_keep
from transformers.utils import can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg

from .cache_hierarchical_xl import (
    HierarchicalXLCache,
    HierarchicalXLCacheLayer,
    cached_slots,
    gather_slots,
    ring_slot,
    slot_rows,
    window_slots,
)
from .configuration_hierarchical_xl import HierarchicalXLConfig
from .modeling_blocks import (
    AttentionPooling,
    FeedForward,
    MultiHeadAttention,
    RotaryEmbedding,
    apply_rotary,
    check_token_inputs,
)


def visible_ranges(
    positions: torch.Tensor, config: HierarchicalXLConfig
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """THE visibility rule: for each kind of key, the half-open range [lo, hi) of absolute indices that a query at
    each position may attend to (token positions, patch indices, section indices). Same shape as `positions`."""
    done = positions // config.patch_size  # patch j is complete for t iff (j + 1) * patch_size <= t
    ranges = {"tokens": (positions - config.local_window + 1, positions + 1)}
    if config.section_size is None:
        ranges["patches"] = (done - config.max_patch_summaries, done)
    else:
        folded = (done - config.max_patch_summaries).clamp_min(0) // config.section_size
        ranges["patches"] = (folded * config.section_size, done)
        ranges["sections"] = (folded - config.max_section_summaries, folded)
    if config.retrieval_top_k > 0:  # patches starting outside the window whose tokens are all in the retrieval window
        ranges["selectable"] = (  # (patch indices below 0 do not exist: a young stream scores only what it has)
            ((positions - config.retrieval_window) // config.patch_size + 1).clamp_min(0),
            (positions - config.local_window) // config.patch_size + 1,
        )
    return ranges


def block_slots(
    lo: torch.Tensor, hi: torch.Tensor, base: torch.Tensor, total: int, end: torch.Tensor, block: int, padded: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The keys of one kind that each block of `block` queries needs. `lo`, `hi` [B, S]: the visible absolute
    indices [lo, hi) of each query; slot `i` of the kind's extended sequence (`total` slots) holds index `base + i`
    ([B]), indices `>= end` ([B]) do not exist. Returns the contiguous slots per block [num_blocks, width] (clamped
    into range) and which query may see which of them [B, num_blocks, block, width], or None when no query sees any."""
    batch, length = lo.shape
    num_blocks = padded // block
    if padded > length:
        lo = nn.functional.pad(lo, (0, padded - length), mode="replicate")
        hi = nn.functional.pad(hi, (0, padded - length), mode="replicate")
    lo, hi = lo.view(batch, num_blocks, block, 1), hi.view(batch, num_blocks, block, 1)
    first = (lo - base.view(-1, 1, 1, 1)).amin(dim=(0, 2, 3)).clamp(0, total)  # [num_blocks]
    stop = (hi - base.view(-1, 1, 1, 1)).amax(dim=(0, 2, 3)).clamp(0, total)
    width = int((stop - first).max()) if batch > 0 else 0
    if width <= 0:
        return None
    slots = first[:, None] + torch.arange(width, device=lo.device)  # [num_blocks, width]
    inside = slots < total
    slots = slots.clamp_max(total - 1)
    absolute = base.view(-1, 1, 1, 1) + slots.view(1, num_blocks, 1, width)  # [B, nb, 1, width]
    exists = inside.view(1, num_blocks, 1, width) & (absolute >= 0) & (absolute < end.view(-1, 1, 1, 1))
    return slots, exists & (absolute >= lo) & (absolute < hi)  # [nb, width], [B, nb, block, width]


def read_indices(
    cached: torch.Tensor | None, new: torch.Tensor, first_new: torch.Tensor, index: torch.Tensor
) -> torch.Tensor:
    """Keys or values of one kind at absolute indices `index` [B, ..., n]: those before this chunk (`< first_new`
    [B]) from the ring cache `cached` [B, h, slots, d] (None without a cache), the others from this chunk's `new`
    [B, h, U, d]. -> [B, ..., h, n, d]; an index held by neither gives some entry (mask it)."""
    offset = (index - first_new.view(-1, *[1] * (index.dim() - 1))).clamp_max(new.shape[2] - 1)
    if cached is None:
        return gather_slots(new, offset.clamp_min(0))
    # every index from the ring, then this chunk's copied over: a `where` over two full gathers costs three times this
    states = gather_slots(cached, ring_slot(index, cached.shape[2]))  # [B, ..., h, n, d]
    fresh = (offset >= 0).unsqueeze(-2).expand(states.shape[:-1]).flatten().nonzero().squeeze(1)
    if fresh.numel():
        rows = slot_rows(new, offset.clamp_min(0)).flatten().index_select(0, fresh)
        dim = new.shape[-1]
        states.view(-1, dim).index_copy_(0, fresh, new.reshape(-1, dim).index_select(0, rows))
    return states


@dataclass
class AttentionPlan:
    """Where each query block finds its keys; computed once per forward and shared by every layer.

    Keys of each kind live in an "extended" sequence per row: the cached window slots (`window_slots`) followed by
    the slots this chunk creates; slot `i` holds absolute index `base + i` (`base` per row and kind). With retrieval
    on, the cache is a ring buffer: the window slots are read from it by absolute index (`memory_index`), the chosen
    far patches and their tokens too, and only the new entries are written back (`ring_index`).
    """

    block: int  # queries per block
    num_blocks: int
    index: torch.Tensor  # [num_blocks * keys_per_block] slots into the concatenated extended keys of all kinds
    mask: torch.Tensor  # [batch * num_blocks, 1, block, keys_per_block] bool, True = may attend
    cached: dict[str, int]  # cached window slots per kind in the extended sequence (0 without a cache)
    new_slots: dict[str, int]  # slots per kind this chunk creates
    first_new: dict[str, torch.Tensor]  # [batch] absolute index of the first slot this chunk creates, per kind
    carry: dict[str, torch.Tensor]  # [batch, n] extended slots the cache stores (-1 = keep; empty without a cache)
    memory_index: dict[str, torch.Tensor] | None  # ring cache: [batch, cached] absolute indices of the cached slots
    ring_index: dict[str, torch.Tensor] | None  # ring cache: [batch, n] absolute indices of the stored entries
    memory_patch_cos: torch.Tensor | None  # ring cache: [batch, cached, head_dim] RoPE of the window's patch summaries
    memory_patch_sin: torch.Tensor | None  # (the ring keeps summary keys before RoPE, for the selection)
    token_patch_slot: torch.Tensor  # [batch, seq] new-patch slot of each token (spare slot for padding)
    patch_cos: torch.Tensor  # [batch, new patches, head_dim] RoPE of the new patch summaries (at their last token)
    patch_sin: torch.Tensor
    section_members: torch.Tensor | None  # [batch, new sections * section_size] extended patch slots per section
    pool_carry_slot: torch.Tensor  # [batch] new-patch slot of the unfinished patch after this chunk
    last_token: torch.Tensor  # [batch] chunk column of the last real token (-1: none), whose key `key_shift` carries
    # retrieval (None when `retrieval_top_k == 0`, or when no query of the chunk has a selectable patch)
    select_index: torch.Tensor | None = None  # [batch * num_blocks, width] patch indices a block's queries choose from
    select_mask: torch.Tensor | None = None  # [batch * num_blocks, block, width] True = selectable by that query
    select_ring: int = 0  # the first `select_ring` candidates are the patch ring's first slots, read as they lie
    window_last: torch.Tensor | None = None  # [batch * num_blocks, block] newest position outside the query's window
    rotary: RotaryEmbedding | None = None  # places the retrieved tokens just before the window
    choice: tuple[torch.Tensor, torch.Tensor] | None = None  # `retrieval_shared_choice`: the first layer's choice
    # `retrieval_labels`: [batch * num_blocks, block] the patch each query should choose (-1 = none), and each deeper
    # layer's (summed selection loss, number of supervised queries)
    selection_targets: torch.Tensor | None = None
    selection_losses: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


@dataclass
class RetrievedPatches:
    """What a block of queries reads of the far patches (`HierarchicalXLAttention.retrieve`), N = batch * blocks."""

    queries: torch.Tensor  # [N, h, q, k, d] each query turned per chosen patch so that its tokens sit before the window
    keys: torch.Tensor  # [N, h, q, k, patch_size, d] the chosen patches' token keys as cached (RoPE at their position)
    values: torch.Tensor  # [N, h, q, k, patch_size, d]
    mask: torch.Tensor  # [N, 1, q, k, patch_size] bool, which of them each query reads (outside its window)
    gate: torch.Tensor  # [N, h, q, k] each chosen patch's logit: its content logit per head
    # training (always when gated): the other selectable patches, each one key of its content logit, summary as value
    summary_logits: torch.Tensor | None = None  # [N, h, q, w]
    summary_values: list[torch.Tensor] | None = None  # the ring's [B, h, ring, d] (a row's blocks share it), the
    # chunk's [N, h, w_new, d]
    summary_mask: torch.Tensor | None = None  # [N, 1, q, w] bool


def build_plan(
    config: HierarchicalXLConfig,
    seen: torch.Tensor,
    num_real: torch.Tensor,
    length: int,
    with_cache: bool,
    rotary: RotaryEmbedding,
    dtype: torch.dtype,
) -> AttentionPlan:
    """Plan the attention of a chunk of `length` columns whose row r starts at position `seen[r]` and holds
    `num_real[r]` real tokens first (padding after)."""
    device = seen.device
    batch = seen.shape[0]
    patch, section = config.patch_size, config.section_size
    positions = seen[:, None] + torch.arange(length, device=device)  # [B, S]
    now = visible_ranges(seen, config)  # ranges of the first position of the chunk, per row
    after = visible_ranges(seen + num_real, config)  # ... and of the first position after it
    new_patches = -(-length // patch) + 1
    new_slots = {"tokens": length, "patches": new_patches}
    if section is not None:
        new_slots["sections"] = -(-(new_patches - 1) // section)
    cache_slots = cached_slots(config) if with_cache else {}
    ring = with_cache and config.retrieval_top_k > 0
    window = window_slots(config) if with_cache else {}
    cached = {kind: window.get(kind, 0) for kind in new_slots}
    # absolute index of extended slot 0, and the end (exclusive) of what exists once the chunk is processed
    start = {"tokens": seen, "patches": now["patches"][1]}
    end = {"tokens": seen + num_real, "patches": after["patches"][1]}
    if section is not None:
        start["sections"], end["sections"] = now["sections"][1], after["sections"][1]
    base = {kind: start[kind] - cached[kind] for kind in new_slots}

    block = min(length, max(config.local_window, patch, 64))
    num_blocks = -(-length // block)
    padded = num_blocks * block
    query_ranges = visible_ranges(positions, config)
    index_parts, mask_parts, offset = [], [], 0
    for kind in new_slots:
        total = cached[kind] + new_slots[kind]
        found = block_slots(*query_ranges[kind], base[kind], total, end[kind], block, padded)
        if found is not None:
            index_parts.append(found[0] + offset)
            mask_parts.append(found[1])  # [B, nb, block, width]
        offset += total
    mask = torch.cat(mask_parts, dim=-1)
    mask[..., 0] |= ~mask.any(dim=-1)  # padding queries that see nothing look at one key (never NaN)

    selection = {}
    if config.retrieval_top_k > 0:  # candidates: the patch ring as it lies (slot order), then this chunk's patches
        selectable = [nn.functional.pad(bound, (0, padded - length), mode="replicate")
                      for bound in query_ranges["selectable"]]
        selectable = [bound.view(batch, num_blocks, block, 1) for bound in selectable]  # [B, nb, block, 1] each
        candidate_index, candidate_mask = [], []
        ring_patches = cache_slots.get("patches", 0) if ring else 0
        occupied = min(ring_patches, int(start["patches"].max())) if ring_patches else 0  # a young ring: its prefix
        if occupied > 0:  # slot s holds the index congruent to s in [first new - slots, first new) (< 0: empty)
            slot = torch.arange(occupied, device=device)
            first = start["patches"][:, None]
            held = (first - ring_patches + ring_slot(slot - first, ring_patches)).view(batch, 1, 1, occupied)
            candidate_index.append(held.expand(batch, num_blocks, 1, occupied).flatten(0, 2))  # [B * nb, occupied]
            candidate_mask.append((held >= selectable[0]) & (held < selectable[1]))  # (selectable starts at >= 0)
        found = block_slots(*query_ranges["selectable"], start["patches"], new_patches, end["patches"], block, padded)
        if found is not None:
            candidate_index.append((start["patches"][:, None, None] + found[0]).flatten(0, 1))  # [B * nb, width]
            candidate_mask.append(found[1])
        if candidate_index:
            padded_positions = nn.functional.pad(positions, (0, padded - length), mode="replicate")
            selection = dict(
                select_index=torch.cat(candidate_index, dim=-1),
                select_mask=torch.cat(candidate_mask, dim=-1).view(batch * num_blocks, block, -1),
                select_ring=occupied,
                window_last=(padded_positions - config.local_window).view(batch * num_blocks, block),
                rotary=rotary,
            )

    # without a cache nothing is carried: no allocation may depend on the (possibly huge) memory bounds
    memory_index = ring_index = memory_patch_cos = memory_patch_sin = None
    if ring:  # only the new entries (the newest `slots` of them), each at its own ring slot
        count = {kind: min(slots, new_slots[kind]) for kind, slots in cache_slots.items()}
        ring_index = {kind: end[kind][:, None] - count[kind] + torch.arange(count[kind], device=device)
                      for kind in cache_slots}
        carry = {kind: torch.where(index >= start[kind][:, None], index - base[kind][:, None], -1)
                 for kind, index in ring_index.items()}
        memory_index = {kind: base[kind][:, None] + torch.arange(cached[kind], device=device) for kind in cache_slots}
        memory_patch_cos, memory_patch_sin = rotary((memory_index["patches"] + 1) * patch - 1, dtype)
    else:
        carry = {kind: (end[kind] - start[kind])[:, None] + torch.arange(slots, device=device)
                 for kind, slots in cache_slots.items()}
    patch_index = start["patches"][:, None] + torch.arange(new_patches, device=device)  # [B, U]
    patch_cos, patch_sin = rotary((patch_index + 1) * patch - 1, dtype)
    section_members = None
    if section is not None:
        section_index = start["sections"][:, None] + torch.arange(new_slots["sections"], device=device)  # [B, V]
        members = section_index[:, :, None] * section + torch.arange(section, device=device)  # [B, V, Q]
        members = members - base["patches"][:, None, None]
        section_members = members.clamp(0, cached["patches"] + new_patches - 1).flatten(1)
    token_patch_slot = positions // patch - start["patches"][:, None]
    is_real = torch.arange(length, device=device) < num_real[:, None]
    return AttentionPlan(
        block=block,
        num_blocks=num_blocks,
        index=torch.cat(index_parts, dim=-1).flatten(),
        mask=mask.view(batch * num_blocks, 1, block, -1),
        cached=cached,
        new_slots=new_slots,
        first_new=start,
        carry=carry,
        memory_index=memory_index,
        ring_index=ring_index,
        memory_patch_cos=memory_patch_cos,
        memory_patch_sin=memory_patch_sin,
        token_patch_slot=torch.where(is_real, token_patch_slot, new_patches),
        patch_cos=patch_cos,
        patch_sin=patch_sin,
        section_members=section_members,
        pool_carry_slot=end["patches"] - start["patches"],
        last_token=num_real - 1,
        **selection,
    )


def rows_matmul(blocks: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """`blocks` [B * nb, h, q, m] times a matrix per block [B * nb, h, m, n], or per row [B, h, m, n] shared by the
    row's blocks (read as it lies, never copied once per block) -> [B * nb, h, q, n]."""
    if rows.shape[0] == blocks.shape[0]:
        return torch.matmul(blocks, rows)
    batch, heads, _, width = rows.shape
    num_blocks, queries = blocks.shape[0] // batch, blocks.shape[2]
    stacked = blocks.view(batch, num_blocks, heads, queries, -1).transpose(1, 2).flatten(2, 3)  # [B, h, nb * q, m]
    product = torch.matmul(stacked, rows)  # [B, h, nb * q, n]
    return product.view(batch, heads, num_blocks, queries, width).transpose(1, 2).reshape(-1, heads, queries, width)


class HierarchicalXLAttention(MultiHeadAttention):
    """Block-local attention over recent tokens, patch summaries and section summaries."""

    def __init__(self, config: HierarchicalXLConfig, layer_idx: int = 0):
        super().__init__(config, is_causal=False)
        self.layer_idx = layer_idx
        self.pooling = AttentionPooling(config.hidden_size)
        if config.key_shift:  # per channel: how much of the previous token's key each key carries
            self.key_shift = nn.Parameter(torch.zeros(config.num_attention_heads, 1, self.head_dim))
        if config.retrieval_top_k > 0 and config.retrieval_softmax == "gated":  # per head: how much retrieval adds
            self.retrieval_gate = nn.Parameter(torch.zeros(config.num_attention_heads, config.hidden_size))
            self.retrieval_gate_bias = nn.Parameter(torch.zeros(config.num_attention_heads))
        if config.retrieval_choice_query and layer_idx > 0:  # the choice's own query: content query + this map
            self.choice_query = nn.Parameter(torch.zeros(config.num_attention_heads * self.head_dim, config.hidden_size))

    def pool_patches(
        self, hidden_states: torch.Tensor, plan: AttentionPlan, cached: dict[str, torch.Tensor] | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Attention pooling of every patch this chunk touches (continuing the cached unfinished patch: `cached` is the
        cache layer's pooling state, None without a cache).

        Online softmax per patch: running max, denominator and weighted sum, so that a patch split over several
        calls pools exactly like a patch seen at once. Returns pooled [B, U, hidden] and the carried pooling state.
        """
        batch, _, hidden = hidden_states.shape
        slots = plan.new_slots["patches"]
        scores = self.pooling.score(hidden_states).squeeze(-1).float()  # [B, S]
        segment = plan.token_patch_slot  # [B, S], padding in spare slot `slots`
        start_max = hidden_states.new_full((batch, slots + 1), float("-inf"), dtype=torch.float32)
        if cached is not None:
            carried = torch.where(cached["pool_sum"] > 0, cached["pool_max"], float("-inf"))
            start_max = torch.cat([carried[:, None], start_max[:, 1:]], dim=1)
        running_max = start_max.scatter_reduce(1, segment, scores.detach(), reduce="amax", include_self=True)
        is_real = segment < slots
        weights = torch.exp(scores - running_max.gather(1, segment)) * is_real  # [B, S]
        total = weights.new_zeros(batch, slots + 1).scatter_add(1, segment, weights)
        members = (weights[..., None] * hidden_states.float())  # [B, S, hidden]
        acc = members.new_zeros(batch, slots + 1, hidden).scatter_add(
            1, segment[..., None].expand(-1, -1, hidden), members
        )
        if cached is not None:
            shift = torch.where(cached["pool_sum"] > 0, cached["pool_max"] - running_max[:, 0], float("-inf"))
            scale = torch.exp(shift)  # [B]
            total = total + nn.functional.pad((cached["pool_sum"] * scale)[:, None], (0, slots))
            acc = acc + nn.functional.pad((cached["pool_acc"] * scale[:, None])[:, None], (0, 0, 0, slots))
        total, acc, running_max = total[:, :slots], acc[:, :slots], running_max[:, :slots]
        pooled = (acc / total.clamp_min(torch.finfo(torch.float32).tiny)[..., None]).to(hidden_states.dtype)
        carry = plan.pool_carry_slot[:, None]  # [B, 1]
        carried_total = total.gather(1, carry).squeeze(1)
        pooling = {
            "pool_max": torch.where(carried_total > 0, running_max.gather(1, carry).squeeze(1), 0.0),
            "pool_sum": carried_total,
            "pool_acc": acc.gather(1, carry[..., None].expand(-1, -1, hidden)).squeeze(1),
        }
        return pooled, pooling

    def forward(
        self,
        hidden_states: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        plan: AttentionPlan,
        cache_layer: HierarchicalXLCacheLayer | None,
    ) -> torch.Tensor:
        batch, length, _ = hidden_states.shape
        content_query, key, value = self.project(hidden_states)  # [B, h, S, d] each
        if cache_layer is not None and not cache_layer.is_initialized:
            cache_layer.lazy_initialization(hidden_states, self.num_heads, self.head_dim)
        if self.config.key_shift:
            key, last_key = self.shift_keys(key, plan, cache_layer)
        query, key = apply_rotary(content_query, cos, sin), apply_rotary(key, cos, sin)

        pooled, pooling = self.pool_patches(hidden_states, plan, cache_layer.pooling if cache_layer else None)
        if self.config.key_shift:
            pooling["last_key"] = last_key
        content_patch_keys = self.split_heads(self.k_proj(pooled))  # [B, h, U, d], before RoPE
        patch_keys = apply_rotary(content_patch_keys, plan.patch_cos, plan.patch_sin)
        new = {"tokens": (key, value), "patches": (patch_keys, self.split_heads(self.v_proj(pooled)))}
        extended = {kind: self.extend(pair, cache_layer, kind, plan) for kind, pair in new.items()}  # cached + new
        if plan.section_members is not None:  # a section is the mean of its patch summaries, cached ones included
            sections = tuple(
                gather_slots(states, plan.section_members).unflatten(2, (plan.new_slots["sections"], -1)).mean(3)
                for states in extended["patches"]
            )  # [B, h, V, d] each
            extended["sections"] = self.extend(sections, cache_layer, "sections", plan)

        all_keys = torch.cat([extended[kind][0] for kind in plan.new_slots], dim=2)  # [B, h, T, d]
        all_values = torch.cat([extended[kind][1] for kind in plan.new_slots], dim=2)
        pad = (0, 0, 0, plan.num_blocks * plan.block - length)
        query = self.to_blocks(nn.functional.pad(query, pad), plan)  # [B * nb, h, block, d]
        block_keys = self.to_blocks(all_keys.index_select(2, plan.index), plan)
        block_values = self.to_blocks(all_values.index_select(2, plan.index), plan)
        if self.config.retrieval_top_k > 0:
            content_query = self.to_blocks(nn.functional.pad(content_query, pad), plan)
            choice_query = None
            if hasattr(self, "choice_query"):
                choice_query = self.split_heads(nn.functional.linear(hidden_states, self.choice_query))  # [B, h, S, d]
                choice_query = self.to_blocks(nn.functional.pad(choice_query, pad), plan)
            retrieved = self.retrieve(
                content_query, new, (content_patch_keys, new["patches"][1]), cache_layer, plan, choice_query
            )
            branch_gate = None
            if self.config.retrieval_softmax == "gated":
                gate = nn.functional.linear(hidden_states, self.retrieval_gate, self.retrieval_gate_bias)  # [B, S, h]
                branch_gate = self.to_blocks(nn.functional.pad(gate.transpose(1, 2)[..., None], pad), plan)
            output = self.attend_with_retrieval(query, block_keys, block_values, plan.mask, retrieved, branch_gate)
        else:
            output, _ = self.attend(query, block_keys, block_values, plan.mask)  # [B * nb, block, hidden]
        if cache_layer is not None:
            stored = extended
            if plan.memory_index is not None:  # the ring keeps summary keys before RoPE: the selection reads them so
                window = extended["patches"][0][:, :, : plan.cached["patches"]]  # never stored (carry: new slots only)
                stored = extended | {"patches": (torch.cat([window, content_patch_keys], 2), extended["patches"][1])}
            cache_layer.update(stored, plan.carry, pooling, plan.ring_index)
        return output.reshape(batch, plan.num_blocks * plan.block, -1)[:, :length]

    def shift_keys(
        self, key: torch.Tensor, plan: AttentionPlan, cache_layer: HierarchicalXLCacheLayer | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`k_t + w * k_(t-1)` for keys [B, h, S, d] before RoPE (the key before a row's first token is the cached
        last key, zeros for a fresh row) -> shifted keys, and the last real token's key [B, h, d] to carry."""
        before = cache_layer.pooling["last_key"] if cache_layer is not None else key.new_zeros(key[:, :, 0].shape)
        shifted = key + self.key_shift * torch.cat([before[:, :, None], key[:, :, :-1]], dim=2)
        last = plan.last_token.clamp_min(0).view(-1, 1, 1, 1).expand(-1, key.shape[1], 1, key.shape[3])
        carried = torch.where((plan.last_token >= 0).view(-1, 1, 1), key.gather(2, last).squeeze(2), before)
        return shifted, carried

    @torch.no_grad()
    def select_patches(
        self, logits: torch.Tensor, plan: AttentionPlan
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each query's `retrieval_top_k` selectable patches of highest importance, NSA's rule: per head, the softmax
        over the query's selectable patches of their content logits (the gates), summed over the heads (one set of
        patches per query, shared by its heads; any one head that wants a patch can have it, where a mean of logits
        lets the other heads veto it). Each logit first loses `retrieval_recency` per patch of age: two patches of
        equal content (repeated text) differ by far more than float noise and the newer wins, so the choice does not
        depend on how a text was cut into calls. The score is the log of that sum.

        logits [B * nb, h, block, w]: each query's content logit of each candidate of `plan.select_index` (fp32). ->
        the chosen candidates' columns (in index order) and whether each choice is a real one (fewer may be
        selectable), both [B * nb, block, k], and the k + 1 best scores [B * nb, block, k + 1] (descending, -inf =
        not selectable; k + 1 only while that many candidates)."""
        # minus recency per patch of age = plus recency per patch after the block's oldest candidate, up to a
        # constant per query, which the softmax drops; small numbers however long the stream
        newer = (plan.select_index - plan.select_index.amin(1, keepdim=True)).float()[:, None, None]  # [N, 1, 1, w]
        lowest = torch.finfo(torch.float32).min  # finite: a query with nothing selectable stays NaN-free
        logits = (logits + self.config.retrieval_recency * newer).masked_fill_(~plan.select_mask[:, None], lowest)
        importance = logits.softmax(dim=-1).sum(dim=1).masked_fill(~plan.select_mask, -1.0)  # [B * nb, q, w]
        width = importance.shape[-1]
        top_k = min(self.config.retrieval_top_k, width)
        best, spots = importance.topk(min(top_k + 1, width), dim=-1)  # [B * nb, q, k + 1], descending
        best = best.clamp_min(0).log()  # the log of the few best only (-inf = not selectable)
        spots, order = spots[..., :top_k].sort(dim=-1)  # the chosen in index order
        return spots, best[..., :top_k].gather(-1, order) > float("-inf"), best

    def selection_loss(self, logits: torch.Tensor, plan: AttentionPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy of choosing each supervised query's target patch (`plan.selection_targets`) under the
        selection's own distribution: per head the softmax of the content logits over the query's selectable patches,
        averaged over the heads (the importance `select_patches` ranks by, divided by the number of heads), so the
        loss is low when any head puts its weight on the target. logits [B * nb, h, q, w] (with their gradient)
        -> (summed loss, number of supervised queries)."""
        lowest = torch.finfo(torch.float32).min  # finite: a query with nothing selectable stays NaN-free
        masked = logits.float().masked_fill(~plan.select_mask[:, None], lowest)
        mixture = masked.log_softmax(dim=-1).logsumexp(dim=1) - math.log(logits.shape[1])  # [N, q, w]
        hit = (plan.select_index[:, None, :] == plan.selection_targets[..., None]) & plan.select_mask  # [N, q, w]
        supervised = hit.any(dim=-1)  # [N, q]
        return -mixture.masked_fill(~hit, 0.0).sum(dim=-1)[supervised].sum(), supervised.sum()

    def retrieve(
        self,
        content_query: torch.Tensor,
        new: dict[str, tuple[torch.Tensor, torch.Tensor]],
        content_patches: tuple[torch.Tensor, torch.Tensor],
        cache_layer: HierarchicalXLCacheLayer | None,
        plan: AttentionPlan,
        choice_query: torch.Tensor | None = None,
    ) -> RetrievedPatches:
        """What each query of each block reads of the far patches (`content_query` [B * nb, h, block, d], before
        RoPE; `content_patches`: this chunk's patch summary keys before RoPE and values [B, h, U, d]; `choice_query`
        [B * nb, h, block, d]: with `retrieval_choice_query`, what the choice adds to the content query).

        Every query scores the block's candidates once (`plan.select_index`: the summary keys of the patch ring as they
        lie, a view shared by all blocks of a row, then this chunk's new patches by index): its content logits (query
        . summary key, both before RoPE) choose its `retrieval_top_k` patches (`select_patches`) and are the gates.
        Each query reads the tokens of its chosen patches outside its window, placed in the `patch_size` positions
        right before the window: a key stored rotated at position j * P + o is seen at distance
        `local_window - 1 + P - o` by the query turned by one angle per chosen patch, whatever j is. Each chosen patch
        weighs as one key whose logit is its gate, the patch's content logit per head. In training mode (and always
        with `retrieval_softmax="gated"`) the other selectable patches join as that key with their summary as value
        (Native Sparse Attention's compressed branch), so the loss reaches the score of every candidate, not only of
        the chosen ones."""
        batch, heads, _, dim = new["tokens"][0].shape
        patch, blocks = self.config.patch_size, content_query.shape[0]
        if plan.select_index is None:  # no query of this chunk has a selectable patch yet
            keys = content_query.new_zeros(blocks, heads, plan.block, 0, patch, dim)
            mask = torch.zeros(blocks, 1, plan.block, 0, patch, dtype=torch.bool, device=content_query.device)
            queries = content_query.new_zeros(blocks, heads, plan.block, 0, dim)
            return RetrievedPatches(queries, keys, keys, mask, content_query.new_zeros(blocks, heads, plan.block, 0))

        def summaries(part: int) -> list[torch.Tensor]:  # the ring's [B, h, ring, d] as it lies, this chunk's by index
            ring = [cache_layer.cached("patches")[part][:, :, : plan.select_ring]] if plan.select_ring else []
            index = plan.select_index[:, plan.select_ring :].view(batch, plan.num_blocks, -1)
            if index.shape[-1] == 0:
                return ring
            return ring + [read_indices(None, content_patches[part], plan.first_new["patches"], index).flatten(0, 1)]

        keys = [part.float().transpose(2, 3) for part in summaries(0)]  # the ring keeps summary keys before RoPE
        query = content_query.float() * self.scaling
        logits = torch.cat([rows_matmul(query, part) for part in keys], -1)
        choice_logits = logits  # what chooses and what `retrieval_labels` supervise
        if choice_query is not None:  # only the selection loss trains the choice's own query: the rest held fixed
            query = query.detach() + choice_query.float() * self.scaling
            choice_logits = torch.cat([rows_matmul(query, part.detach()) for part in keys], -1)
        spots, real, _ = self.select_patches(choice_logits.detach(), plan)  # [B * nb, q, k]
        if plan.selection_targets is not None and self.layer_idx > 0:  # the first layer's queries are the tokens
            plan.selection_losses.append(self.selection_loss(choice_logits, plan))
        if self.config.retrieval_shared_choice:  # the first layer's choice, then this layer's own (read once)
            if plan.choice is None:
                plan.choice = (spots, real)
            else:
                first, first_real = plan.choice
                real = real & ~((spots[..., None] == first[..., None, :]) & first_real[..., None, :]).any(-1)
                spots, real = torch.cat([first, spots], dim=-1), torch.cat([first_real, real], dim=-1)  # [.., 2k]
        top_k = spots.shape[-1]
        chosen = plan.select_index.gather(1, spots.flatten(1)).view_as(spots)  # patch indices
        gate = logits.gather(3, spots[:, None].expand(-1, heads, -1, -1))  # [B * nb, h, q, k]
        members = chosen[..., None] * patch + torch.arange(patch, device=chosen.device)  # [B * nb, q, k, P] positions
        attended = real[..., None] & (members <= plan.window_last[..., None, None])  # the window's are already in

        def read(part: int) -> torch.Tensor:  # -> [B * nb, h, q, k, P, d]
            cached = cache_layer.cached("tokens")[part] if cache_layer is not None else None
            states = read_indices(cached, new["tokens"][part], plan.first_new["tokens"],
                                  members.view(batch, plan.num_blocks, -1))  # [B, nb, h, n, d]
            return states.view(blocks, heads, plan.block, top_k, patch, dim)

        cos, sin = plan.rotary((chosen + 1) * patch + self.config.local_window - 1, content_query.dtype)
        queries = apply_rotary(content_query[:, :, :, None], cos[:, None], sin[:, None])  # [B * nb, h, q, k, d]
        retrieved = RetrievedPatches(queries, read(0), read(1), attended[:, None], gate)
        if self.training or self.config.retrieval_softmax == "gated":  # every other candidate, one key: its summary
            was_chosen = torch.zeros_like(plan.select_mask).scatter_(2, spots, real)  # [B * nb, q, w]
            retrieved.summary_logits = logits
            retrieved.summary_values = summaries(1)
            retrieved.summary_mask = (plan.select_mask & ~was_chosen)[:, None]  # [B * nb, 1, q, w]
        return retrieved

    def attend_with_retrieval(
        self,
        query: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        mask: torch.Tensor,
        retrieved: RetrievedPatches,
        branch_gate: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One softmax over a block's keys (window, summaries: shared by its queries) and what each query reads of the
        far patches, where a chosen patch weighs as one key whose logit is its gate and shares that weight among its
        tokens by their own softmax (Landmark Attention's grouped softmax: token logit - logsumexp of its patch's
        token logits + gate; `retrieval_softmax="joint"`: each token by its own logit). `"gated"`: the retrieved
        tokens (each by its own logit) and the other candidates' summaries form a softmax of their own, whose output
        is added to the window's, per head, times `branch_gate` [N, h, q, 1] (NSA's gated branches).
        query [N, h, q, d], keys/values [N, h, K, d], mask [N, 1, q, K] -> [N, q, hidden]."""
        shared = torch.matmul(query, keys.transpose(2, 3)) * self.scaling  # [N, h, q, K]
        own = torch.einsum("nhqkd,nhqkpd->nhqkp", retrieved.queries, retrieved.keys) * self.scaling
        lowest = torch.finfo(torch.float32).min  # finite: a patch none of whose tokens is read stays NaN-free
        own = own.float().masked_fill(~retrieved.mask, lowest)  # [N, h, q, k, P]
        if self.config.retrieval_softmax == "grouped":
            own = own - own.logsumexp(dim=-1, keepdim=True) + retrieved.gate[..., None].float()
        far = [own.masked_fill(~retrieved.mask, float("-inf")).flatten(3)]
        far_values = [retrieved.values.flatten(3, 4)]  # [N, h, q, k * P, d]
        if retrieved.summary_logits is not None:
            summary = retrieved.summary_logits.float().masked_fill(~retrieved.summary_mask, float("-inf"))
            far.extend(summary.split([part.shape[2] for part in retrieved.summary_values], dim=-1))
            far_values.extend(retrieved.summary_values)  # shared by the block's (or the row's) queries
        near = shared.float().masked_fill(~mask, float("-inf"))
        if branch_gate is None:  # one softmax over everything
            output = self.weigh([near] + far, [values] + far_values)
        else:  # the window's softmax, plus the far branch's (empty for a query with no far patch) through its gate
            far_output = self.weigh(far, far_values, may_be_empty=True)
            output = self.weigh([near], [values]) + branch_gate * far_output
        return self.o_proj(output.transpose(1, 2).reshape(*output.shape[:1], output.shape[2], -1))

    def weigh(self, logits: list[torch.Tensor], values: list[torch.Tensor], may_be_empty: bool = False) -> torch.Tensor:
        """One softmax over the keys of every part (logits [N, h, q, n_i], -inf = masked; `may_be_empty`: a query
        none of whose keys is visible gets 0) and the weighted sum of their values ([N, h, n_i, d], shared by a
        block's queries, [B, h, n_i, d], shared by all blocks of a row, or [N, h, q, n_i, d], per query)
        -> [N, h, q, d]."""
        widths = [part.shape[-1] for part in logits]
        logits = torch.cat(logits, dim=-1)
        if may_be_empty:
            visible = logits.isfinite().any(dim=-1, keepdim=True)
            weights = nn.functional.softmax(logits.masked_fill(~visible, 0.0), dim=-1) * visible
        else:  # the plan gives every query at least one key
            weights = nn.functional.softmax(logits, dim=-1)
        weights = nn.functional.dropout(weights.to(values[0].dtype), p=self.attention_dropout, training=self.training)
        output = 0
        for piece, value in zip(weights.split(widths, dim=-1), values):
            if value.dim() == 5:
                output = output + torch.einsum("nhqk,nhqkd->nhqd", piece, value)
            else:
                output = output + rows_matmul(piece, value)
        return output

    @staticmethod
    def extend(
        new: tuple[torch.Tensor, torch.Tensor],
        cache_layer: HierarchicalXLCacheLayer | None,
        kind: str,
        plan: AttentionPlan,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) [B, h, new, d] -> the cached window slots of `kind` followed by the new ones [B, h, T, d]
        (a sliding cache is its window; a ring cache's window slots are read by index)."""
        if cache_layer is None:
            return new
        cached = cache_layer.cached(kind)
        if plan.memory_index is not None:
            slots = ring_slot(plan.memory_index[kind], cached[0].shape[2])
            cached = tuple(gather_slots(states, slots) for states in cached)
            if kind == "patches":  # the ring keeps summary keys before RoPE
                cached = (apply_rotary(cached[0], plan.memory_patch_cos, plan.memory_patch_sin), cached[1])
        return tuple(torch.cat([states_cached, states], 2) for states_cached, states in zip(cached, new))

    def to_blocks(self, states: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
        """[B, h, num_blocks * n, d] -> [B * num_blocks, h, n, d]."""
        batch, heads, _, dim = states.shape
        states = states.view(batch, heads, plan.num_blocks, -1, dim).transpose(1, 2)
        return states.reshape(batch * plan.num_blocks, heads, -1, dim)


class HierarchicalXLDecoderLayer(nn.Module):
    """Pre-norm block: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: HierarchicalXLConfig, layer_idx: int = 0):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = HierarchicalXLAttention(config, layer_idx)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = FeedForward(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        plan: AttentionPlan,
        cache_layer: HierarchicalXLCacheLayer | None,
    ) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states), cos, sin, plan, cache_layer)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class HierarchicalXLPreTrainedModel(PreTrainedModel):
    config_class = HierarchicalXLConfig
    config: HierarchicalXLConfig
    base_model_prefix = "model"
    _no_split_modules = ["HierarchicalXLDecoderLayer"]
    _supports_sdpa = True
    # initialised at 0 (the model without them): a checkpoint trained without `key_shift`, gated retrieval or the
    # choice query loads with them on
    _keys_to_ignore_on_load_missing = [
        r"self_attn\.key_shift$", r"self_attn\.retrieval_gate(_bias)?$", r"self_attn\.choice_query$"
    ]

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, HierarchicalXLAttention) and module.config.key_shift:
            init.zeros_(module.key_shift)  # starts as the model without it
        if isinstance(module, HierarchicalXLAttention) and hasattr(module, "retrieval_gate"):
            init.zeros_(module.retrieval_gate)  # the branch starts closed: the model without retrieval
            init.zeros_(module.retrieval_gate_bias)
        if isinstance(module, HierarchicalXLAttention) and hasattr(module, "choice_query"):
            init.zeros_(module.choice_query)  # chooses as the content query: the model without it
        if isinstance(module, RotaryEmbedding):  # non-persistent buffer: recompute it (meta-device loading)
            head_dim = self.config.hidden_size // self.config.num_attention_heads
            exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=module.inv_freq.device) / head_dim
            init.copy_(module.inv_freq, 1.0 / (self.config.rope_theta**exponents))

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        self.config.validate()  # before the folder, the code or the weights are written
        super().save_pretrained(save_directory, *args, **kwargs)


@dataclass
class HierarchicalXLModelOutput(BaseModelOutputWithPast):
    """`retrieval_loss`: with `retrieval_labels`, the mean selection cross-entropy over the supervised queries of
    every layer after the first (`HierarchicalXLModel.forward`); None otherwise."""

    retrieval_loss: torch.FloatTensor | None = None


@dataclass
class HierarchicalXLCausalLMOutput(CausalLMOutputWithPast):
    """`loss` is the language-model loss alone; `retrieval_loss` as in `HierarchicalXLModelOutput` (weigh and add
    it yourself, as `segment_lm_step(..., retrieval_labels=..., retrieval_weight=...)` does)."""

    retrieval_loss: torch.FloatTensor | None = None


def check_retrieval_labels(
    retrieval_labels: torch.Tensor, positions: torch.Tensor, num_real: torch.Tensor, config: HierarchicalXLConfig
) -> torch.Tensor:
    """Validate `retrieval_labels` [batch, seq_len] (on the model's device, in position order) against the
    selection rule -> the patch each query should choose [batch, seq_len] (-1 = none)."""
    if config.retrieval_top_k == 0:
        raise ValueError("`retrieval_labels` supervise the choice of far patches: set `retrieval_top_k` > 0.")
    if retrieval_labels.shape != positions.shape:
        raise ValueError(f"`retrieval_labels` must be [batch, seq_len] = {tuple(positions.shape)} like `input_ids`, "
                         f"got shape {tuple(retrieval_labels.shape)}.")
    labels = retrieval_labels
    supervised = (labels != -100) & (torch.arange(positions.shape[1], device=positions.device) < num_real[:, None])
    patch = torch.div(labels, config.patch_size, rounding_mode="floor")
    lo, hi = visible_ranges(positions, config)["selectable"]
    wrong = supervised & ((labels < 0) | (patch < lo) | (patch >= hi))
    if bool(wrong.any()):
        row, column = (int(i) for i in wrong.nonzero()[0])
        first, stop = (int(bound[row, column]) * config.patch_size for bound in (lo, hi))
        raise ValueError(
            f"`retrieval_labels[{row}, {column}]` = {int(labels[row, column])}: the query at position "
            f"{int(positions[row, column])} can only choose a position in a selectable patch, [{first}, {stop}) "
            "(outside its `local_window`, inside `retrieval_window`); use -100 for a query without a target."
        )
    return torch.where(supervised, patch, -1)


def check_cache(cache: object, config: HierarchicalXLConfig) -> None:
    """Accept any HierarchicalXLCache (the package's or a checkpoint's remote-code copy: recognised by its marker,
    not its class) made for the same cache layout as `config`."""
    if not getattr(cache, "is_hierarchical_xl_cache", False):
        kind = type(cache)
        raise TypeError(
            f"`cache` must be a HierarchicalXLCache (hier_transformers.cache_hierarchical_xl, or the "
            f"cache_hierarchical_xl module of a checkpoint loaded with trust_remote_code=True), got "
            f"{kind.__module__}.{kind.__qualname__}."
        )
    cache.check_layout(config)


def read_attention_mask(
    attention_mask: torch.Tensor | None,
    cache: HierarchicalXLCache | None,
    batch: int,
    length: int,
    seen: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate a 2D mask for this chunk -> (real tokens [B], leading padding [B], row ends with padding [B])."""
    device = seen.device
    if attention_mask is None:
        attention_mask = torch.ones(batch, length, dtype=torch.bool, device=device)
    past = cache.get_seq_length() if cache is not None else 0
    if attention_mask.dim() != 2 or attention_mask.shape != (batch, attention_mask.shape[1]) or (
        attention_mask.shape[1] not in (length, past + length)
    ):
        raise ValueError(
            f"`attention_mask` must be 2D [batch, seq_len] with batch={batch} and seq_len={length} (or {past + length} "
            f"including the cached columns), got shape {tuple(attention_mask.shape)}."
        )
    is_real = attention_mask[:, -length:].to(device=device, dtype=torch.bool)
    num_real = is_real.sum(1)
    lead = torch.where(num_real > 0, is_real.int().argmax(1), 0)
    columns = torch.arange(length, device=device)
    expected = (columns >= lead[:, None]) & (columns < (lead + num_real)[:, None])
    if not torch.equal(is_real, expected) or bool(((lead > 0) & (seen > 0)).any()):
        raise ValueError(
            "`attention_mask` has padding between real tokens of a row. Pad on the left for generation "
            "(tokenizer.padding_side = 'left'); right padding is only allowed at the end of a row."
        )
    if cache is not None and cache.closed is not None and bool((cache.closed & (num_real > 0)).any()):
        raise ValueError(
            "A row of the cache ended with right padding and cannot be continued. Pad prompts on the left for "
            "generation (tokenizer.padding_side = 'left')."
        )
    closes = (lead + num_real < length) & (seen + num_real > 0)
    return num_real, lead, closes


class HierarchicalXLModel(HierarchicalXLPreTrainedModel):
    """Embeddings, the hierarchical decoder layers and a final RMSNorm."""

    def __init__(self, config: HierarchicalXLConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(
            [HierarchicalXLDecoderLayer(config, index) for index in range(config.num_hidden_layers)]
        )
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.hidden_size // config.num_attention_heads, config.rope_theta)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: HierarchicalXLCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        retrieval_labels: torch.LongTensor | None = None,
        **kwargs,
    ) -> HierarchicalXLModelOutput:
        """Inputs [batch, seq_len] of any length. `attention_mask`: 1 = real token; left padding (or right padding
        at the end of rows). With `cache`, the chunk continues the cached rows (a 2D mask may include the cached
        columns, as `generate` passes it). `use_cache` defaults to `config.use_cache` outside training.
        `retrieval_labels` [batch, seq_len] (retrieval on): for each query the absolute position (counted like the
        cache counts, from the row's first token) of a token whose patch it should choose, -100 = none; the output's
        `retrieval_loss` is then the cross-entropy of that choice in every layer after the first (whose queries are
        the tokens themselves, with no context to choose by), averaged over the supervised queries and layers. A
        label outside the query's selectable patches is refused.
        `output_attentions=True` is refused: the attention is block-local over three kinds of keys, there is no
        [seq_len, seq_len] map to return."""
        check_token_inputs(input_ids, inputs_embeds, self.config.vocab_size, self.config.hidden_size)
        if output_attentions or (output_attentions is None and self.config.output_attentions):
            raise ValueError(
                "HierarchicalXL does not return attention weights (`output_attentions=True`, or "
                "`config.output_attentions`): each query block attends to its own gathered window of tokens, patch "
                "summaries and section summaries, so there is no [seq_len, seq_len] map. Leave it unset."
            )
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and cache is None:
            cache = HierarchicalXLCache(self.config)
        if cache is not None:
            check_cache(cache, self.config)
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        batch, length = inputs_embeds.shape[:2]
        device = inputs_embeds.device
        seen = torch.zeros(batch, dtype=torch.long, device=device)
        if cache is not None and cache.seen is not None:
            seen = cache.seen
        if seen.shape[0] != batch:
            raise ValueError(f"The cache holds {seen.shape[0]} rows but the inputs have batch size {batch}.")
        num_real, lead, closes = read_attention_mask(attention_mask, cache, batch, length, seen)

        # Move each row's leading padding to its end, so that column i of row r is position seen[r] + i.
        order = None
        if bool((lead > 0).any()):
            order = (torch.arange(length, device=device) + lead[:, None]) % length  # [B, S]
            inputs_embeds = inputs_embeds.gather(1, order[..., None].expand_as(inputs_embeds))
        plan = build_plan(
            self.config, seen, num_real, length, cache is not None, self.rotary_emb, inputs_embeds.dtype
        )
        positions = seen[:, None] + torch.arange(length, device=device)
        if retrieval_labels is not None:
            retrieval_labels = retrieval_labels.to(device)
            if order is not None:
                retrieval_labels = retrieval_labels.gather(1, order)
            targets = check_retrieval_labels(retrieval_labels, positions, num_real, self.config)
            padded = plan.num_blocks * plan.block
            plan.selection_targets = nn.functional.pad(targets, (0, padded - length), value=-1).view(-1, plan.block)
        cos, sin = self.rotary_emb(positions, inputs_embeds.dtype)

        def restore(states: torch.Tensor) -> torch.Tensor:
            return states if order is None else states.scatter(1, order[..., None].expand_as(states), states)

        hidden_states = inputs_embeds
        all_hidden_states = (restore(hidden_states),) if output_hidden_states else None
        for index, layer in enumerate(self.layers):
            cache_layer = cache.layers[index] if cache is not None else None
            hidden_states = layer(hidden_states, cos, sin, plan, cache_layer)
            if output_hidden_states:
                all_hidden_states += (restore(hidden_states),)
        hidden_states = restore(self.norm(hidden_states))
        if cache is not None:
            cache.advance(num_real, length, closes)
        retrieval_loss = None
        if retrieval_labels is not None:
            zero = torch.zeros((), device=device)
            total = sum((loss for loss, _ in plan.selection_losses), zero)
            count = sum((number for _, number in plan.selection_losses), zero)  # no host sync per layer
            retrieval_loss = total / count.clamp_min(1)
        return HierarchicalXLModelOutput(last_hidden_state=hidden_states, cache=cache, hidden_states=all_hidden_states,
                                         retrieval_loss=retrieval_loss)


class HierarchicalXLForCausalLM(HierarchicalXLPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: HierarchicalXLConfig):
        super().__init__(config)
        self.model = HierarchicalXLModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate() must build a HierarchicalXLCache, see `_prepare_cache_for_generation`

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, *args, **kwargs) -> None:
        if model_kwargs.get("cache") is None and generation_config.use_cache:
            if generation_config.cache_implementation not in (None, "dynamic"):
                raise ValueError(
                    f"HierarchicalXL only supports its own bounded cache; got cache_implementation="
                    f"{generation_config.cache_implementation!r}. Leave it unset."
                )
            model_kwargs["cache"] = HierarchicalXLCache(self.config)
            return
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    def prepare_inputs_for_generation(
        self, input_ids: torch.LongTensor, *args, cache: HierarchicalXLCache | None = None, **kwargs
    ) -> dict:
        past = cache.get_seq_length() if cache is not None else 0
        if kwargs.get("inputs_embeds") is None and input_ids.shape[1] <= past:
            raise ValueError(
                f"`generate(input_ids, cache=cache)`: `input_ids` must be the whole sequence so far, the {past} "
                f"columns the cache already holds followed by at least one new token (pass the `sequences` of the "
                f"call that filled the cache, plus any new text), got {input_ids.shape[1]} columns. For an unrelated "
                "prompt use a new cache."
                if past
                else "`generate` needs a prompt of at least one token; to start from nothing, pass the BOS token."
            )
        return super().prepare_inputs_for_generation(input_ids, *args, cache=cache, **kwargs)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: HierarchicalXLCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        retrieval_labels: torch.LongTensor | None = None,
        **kwargs,
    ) -> HierarchicalXLCausalLMOutput:
        """`labels` [batch, seq_len] (-100 = ignored) are shifted inside; extra kwargs such as
        `num_items_in_batch` go to the loss, so Trainer's gradient accumulation is exact. `retrieval_labels`: see
        `HierarchicalXLModel.forward` (`retrieval_loss` in the output; `loss` stays the language-model loss)."""
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            retrieval_labels=retrieval_labels,
        )
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return HierarchicalXLCausalLMOutput(
            loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states,
            retrieval_loss=outputs.retrieval_loss,
        )


__all__ = ["HierarchicalXLPreTrainedModel", "HierarchicalXLModel", "HierarchicalXLForCausalLM"]
