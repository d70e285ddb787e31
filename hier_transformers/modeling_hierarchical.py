"""Hierarchical-attention encoder (`model_type="hierarchical"`): tokens -> patches -> sections -> document.

Flat inputs `[batch, seq_len]` of any length are padded internally to a multiple of `patch_size * section_size` and
viewed as blocks `[batch, n_sections, section_size, patch_size]`. Every unit carries a summary slot:

- token level: attention inside each patch over `[patch slot, tokens]`, `[B * n_patches, 1 + patch_size, H]`;
- patch level: attention inside each section over `[section slot, patch summaries]`, `[B * n_sections, 1 + section_size, H]`;
- section level: attention over the document, `[document slot, section summaries]`, `[B, 1 + n_sections, H]`.

Contextualised slots are written back, so in the next layer tokens read their (by then document-aware) patch
summary. That path needs one layer per level to come back down, so in a 2-4 layer model a token barely feels another
section (exactly zero with 2 layers). `config.top_down="summary_keys"` (the default) adds a direct top-down path: in
every layer after the first one that runs a higher level, the token-level attention also reads the current summary of
the token's section and of the document as two extra keys, `[patch slot, tokens] -> [patch slot, tokens, section,
document]`; with attention pooling the document summary is pooled from the section summaries before the section level
(as sections are pooled from patches), so it carries every section from the first layer on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import ModelOutput, can_return_tuple

from .configuration_hierarchical import HierarchicalConfig
from .modeling_blocks import AttentionPooling, FeedForward, MultiHeadAttention, RotaryEmbedding, apply_rotary
from .modeling_blocks import check_token_inputs


@dataclass
class HierarchicalModelOutput(ModelOutput):
    r"""
    Output of [`HierarchicalModel`]. `n_patches = n_sections * section_size` counts the internal padding patches too
    (`patch_mask` tells them apart); `P = patch_size`, `Q = section_size`, `h` = attention heads.

    last_hidden_state (`[B, seq_len, H]`): token states, exactly one per input token.
    pooler_output (`[B, H]`): the document summary (same tensor as `document_summary`).
    document_summary (`[B, H]`): the document slot after the last layer.
    patch_summaries (`[B, n_patches, H]`): patch slots after the last layer, zero for patches without a valid token.
    patch_mask (`[B, n_patches]`, bool): patches holding at least one valid token.
    section_summaries (`[B, n_sections, H]`): section slots, zero for sections without a valid patch.
    section_mask (`[B, n_sections]`, bool): sections holding at least one valid patch.
    hidden_states (tuple of `[B, seq_len, H]`): token states after the embeddings and after every layer.
    token_attentions (tuple over layers of `[B, n_patches, h, 1 + P, 1 + P]`): index 0 is the patch slot.
    patch_attentions (tuple over the layers running the patch level, `[B, n_sections, h, 1 + Q, 1 + Q]`): index 0 is
        the section slot, then the patches of the section.
    section_attentions (tuple over the layers running the section level, `[B, h, 1 + n_sections, 1 + n_sections]`):
        index 0 is the document slot, then the sections.
    patch_pooling_weights (`summary_type="attention_pooling"` only; tuple over the layers running the patch level,
        `[B, n_patches, P]`): weights pooling each patch's tokens into its summary.
    section_pooling_weights (`summary_type="attention_pooling"` only; tuple over the layers running the section
        level, `[B, n_sections, Q]`): weights pooling each section's patch summaries into its summary.
    document_pooling_weights (`summary_type="attention_pooling"` and `top_down="summary_keys"` only; tuple over the
        layers running the section level, `[B, n_sections]`): weights pooling the section summaries into the document.

    With `top_down="summary_keys"`, `token_attentions` of the layers after the first one that runs a higher level
    have `1 + P + 2` keys: the patch slot, the tokens, then the section summary and the document summary.
    Rows with left padding are laid out from their first real token (as if right-padded); `last_hidden_state` is
    returned at the caller's positions, the summaries and attentions in that left-aligned layout.
    """

    last_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None
    document_summary: torch.Tensor | None = None
    patch_summaries: torch.Tensor | None = None
    patch_mask: torch.Tensor | None = None
    section_summaries: torch.Tensor | None = None
    section_mask: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    token_attentions: tuple[torch.Tensor, ...] | None = None
    patch_attentions: tuple[torch.Tensor, ...] | None = None
    section_attentions: tuple[torch.Tensor, ...] | None = None
    patch_pooling_weights: tuple[torch.Tensor, ...] | None = None
    section_pooling_weights: tuple[torch.Tensor, ...] | None = None
    document_pooling_weights: tuple[torch.Tensor, ...] | None = None


@dataclass
class HierarchicalHeadOutput(ModelOutput):
    r"""
    Output of the task heads. `logits` is `[B, num_labels]` (sequence classification), `[B, seq_len, vocab_size]`
    (masked LM) or `[B, seq_len, num_labels]` (token classification). The other fields are those of
    [`HierarchicalModelOutput`], so the attentions of every level (and the pooling weights) reach the user.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    token_attentions: tuple[torch.Tensor, ...] | None = None
    patch_attentions: tuple[torch.Tensor, ...] | None = None
    section_attentions: tuple[torch.Tensor, ...] | None = None
    patch_pooling_weights: tuple[torch.Tensor, ...] | None = None
    section_pooling_weights: tuple[torch.Tensor, ...] | None = None
    document_pooling_weights: tuple[torch.Tensor, ...] | None = None

    @classmethod
    def from_base(cls, outputs: HierarchicalModelOutput, logits: torch.Tensor, loss: torch.Tensor | None):
        return cls(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            token_attentions=outputs.token_attentions,
            patch_attentions=outputs.patch_attentions,
            section_attentions=outputs.section_attentions,
            patch_pooling_weights=outputs.patch_pooling_weights,
            section_pooling_weights=outputs.section_pooling_weights,
            document_pooling_weights=outputs.document_pooling_weights,
        )


@dataclass
class HierarchyMasks:
    """Validity of every unit, and the boolean key masks of the three levels (True = may attend).

    Slots are always valid keys, so no query row is ever fully masked (no NaN, also for all-padding units).
    """

    tokens: torch.Tensor  # [B, n_patches, P]
    patches: torch.Tensor  # [B, n_patches]
    sections: torch.Tensor  # [B, n_sections]
    token_keys: torch.Tensor  # [B * n_patches, 1, 1, 1 + P]
    token_context_keys: torch.Tensor  # [B * n_patches, 1, 1, 1 + P + 2]: then the section and document summaries
    patch_keys: torch.Tensor  # [B * n_sections, 1, 1, 1 + Q]
    section_keys: torch.Tensor  # [B, 1, 1, 1 + n_sections]

    @classmethod
    def from_token_mask(cls, tokens: torch.Tensor, section_size: int) -> HierarchyMasks:
        """tokens: [B, n_patches, P] bool."""
        batch_size, n_patches, _ = tokens.shape
        patches = tokens.any(-1)  # [B, n_patches]
        grouped = patches.view(batch_size, -1, section_size)  # [B, n_sections, Q]
        sections = grouped.any(-1)  # [B, n_sections]

        def with_slot(members: torch.Tensor) -> torch.Tensor:
            # [G, L] -> [G, 1, 1, 1 + L]: the slot key (always valid) comes first
            slot = torch.ones_like(members[:, :1])
            return torch.cat([slot, members], dim=-1)[:, None, None, :]

        token_keys = with_slot(tokens.reshape(batch_size * n_patches, -1))
        return cls(
            tokens=tokens,
            patches=patches,
            sections=sections,
            token_keys=token_keys,
            token_context_keys=nn.functional.pad(token_keys, (0, 2), value=True),
            patch_keys=with_slot(grouped.reshape(-1, section_size)),
            section_keys=with_slot(sections),
        )


def roll_rows(states: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Rotate every row of `states` [B, N, ...] left by its own `shifts[b]` positions (negative: right)."""
    batch_size, length = states.shape[:2]
    index = (torch.arange(length, device=states.device) + shifts[:, None]) % length  # [B, N]
    index = index.view(batch_size, length, *([1] * (states.dim() - 2))).expand_as(states)
    return states.gather(1, index)


class HierarchicalEmbeddings(nn.Module):
    """BERT's word + position + token-type embeddings, with positions restarting in every patch, plus the slots.

    The patch slot is embedded like BERT's `[CLS]`: as a token at position 0 of its patch (type 0), in front of the
    patch's tokens at positions `1..patch_size`. Section and document slots are learned vectors; patch-level
    positions (index of the patch in its section, 0 = section slot) are a learned table added at the patch level.
    """

    def __init__(self, config: HierarchicalConfig):
        super().__init__()
        hidden = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, hidden, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, hidden)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, hidden)
        self.layer_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.patch_slot = nn.Parameter(torch.zeros(hidden))
        self.section_slot = nn.Parameter(torch.zeros(hidden))
        self.document_slot = nn.Parameter(torch.zeros(hidden))
        self.patch_position_embeddings = nn.Embedding(config.section_size + 1, hidden)

    def forward(self, inputs_embeds: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        """inputs_embeds [B, n_patches, P, H], token_type_ids [B, n_patches, P] -> [B, n_patches, 1 + P, H]."""
        batch_size, n_patches, patch_size, hidden = inputs_embeds.shape
        slot = self.patch_slot.to(inputs_embeds.dtype).expand(batch_size, n_patches, 1, hidden)
        words = torch.cat([slot, inputs_embeds], dim=2)  # [B, n_patches, 1 + P, H]
        types = nn.functional.pad(token_type_ids, (1, 0))  # the slot has type 0
        positions = torch.arange(patch_size + 1, device=inputs_embeds.device)
        embeddings = words + self.token_type_embeddings(types) + self.position_embeddings(positions)
        return self.dropout(self.layer_norm(embeddings))


class HierarchicalBlock(nn.Module):
    """BERT-style post-LN transformer block over `[units, 1 + members, H]`; each level of each layer owns one."""

    def __init__(self, config: HierarchicalConfig):
        super().__init__()
        self.attention = MultiHeadAttention(config)
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.feed_forward = FeedForward(config)
        self.output_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        output_attentions: bool = False,
        context: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden_states [G, L, H]; context [G, C, H] (optional): extra keys/values read but not updated, appended
        after the L keys (`attention_mask` then covers `L + C` keys)."""
        query, key, value = self.attention.project(hidden_states)  # each [G, h, L, d]
        if rotary is not None:
            query, key = apply_rotary(query, *rotary), apply_rotary(key, *rotary)
        if context is not None:
            context_key, context_value = self._project_context(context, key.shape[0])
            key = torch.cat([key, context_key], dim=2)  # [G, h, L + C, d]
            value = torch.cat([value, context_value], dim=2)
        attended, weights = self.attention.attend(query, key, value, attention_mask, output_attentions)
        hidden_states = self.attention_norm(hidden_states + self.dropout(attended))
        hidden_states = self.output_norm(hidden_states + self.dropout(self.feed_forward(hidden_states)))
        return hidden_states, weights


    def _project_context(self, context: torch.Tensor, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
        """context [G', C, H], shared by `n_groups // G'` consecutive groups -> key, value [G, h, C, d]."""
        repeat = n_groups // context.shape[0]

        def projected(linear: nn.Linear) -> torch.Tensor:
            states = self.attention.split_heads(linear(context))  # [G', h, C, d]
            return states.unsqueeze(1).expand(-1, repeat, -1, -1, -1).reshape(n_groups, *states.shape[1:])

        return projected(self.attention.k_proj), projected(self.attention.v_proj)


class HierarchicalLayer(GradientCheckpointingLayer):
    """One layer: token level, then (per `config.hierarchy_layout`) patch level, then section level."""

    def __init__(self, config: HierarchicalConfig, layer_idx: int):
        super().__init__()
        levels = config.levels(layer_idx)
        pooling = config.summary_type == "attention_pooling"
        self.token_level = HierarchicalBlock(config)
        top_down = config.top_down == "summary_keys"
        # top-down: once a level above the tokens has run, the tokens read the current section and document summaries
        self.reads_summaries = top_down and any(config.levels(index) != ("token",) for index in range(layer_idx))
        self.patch_level = HierarchicalBlock(config) if "patch" in levels else None
        self.section_level = HierarchicalBlock(config) if "section" in levels else None
        self.patch_pooling = AttentionPooling(config.hidden_size) if pooling and "patch" in levels else None
        self.section_pooling = AttentionPooling(config.hidden_size) if pooling and "section" in levels else None
        # with the top-down path the document summary is pooled from the sections too, so it carries every section
        pool_document = pooling and top_down and "section" in levels
        self.document_pooling = AttentionPooling(config.hidden_size) if pool_document else None

    def forward(
        self,
        tokens: torch.Tensor,
        sections: torch.Tensor,
        document: torch.Tensor,
        patch_positions: torch.Tensor,
        masks: HierarchyMasks,
        section_rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """tokens [B, n_patches, 1 + P, H] (slot first), sections [B, n_sections, H], document [B, H],
        patch_positions [1 + Q, H]. Returns the three updated states and this layer's attentions by name."""
        batch_size, n_patches, patch_len, hidden = tokens.shape
        n_sections = sections.shape[1]
        section_size = n_patches // n_sections
        extras: dict[str, torch.Tensor] = {}

        context, token_keys = None, masks.token_keys
        if self.reads_summaries:
            # [B * n_sections, 2, H]: each section's summary and the document summary, shared by the section's patches
            context = torch.stack([sections, document.unsqueeze(1).expand_as(sections)], dim=2).flatten(0, 1)
            token_keys = masks.token_context_keys
        states, weights = self.token_level(
            tokens.reshape(batch_size * n_patches, patch_len, hidden), token_keys, None, output_attentions, context
        )
        tokens = states.view(batch_size, n_patches, patch_len, hidden)
        if output_attentions:
            extras["token_attentions"] = weights.view(batch_size, n_patches, *weights.shape[1:])

        if self.patch_level is not None:
            patches = tokens[:, :, 0]  # [B, n_patches, H]
            if self.patch_pooling is not None:
                patches, pooling = self.patch_pooling(tokens[:, :, 1:], masks.tokens)
                if output_attentions:
                    extras["patch_pooling_weights"] = pooling  # [B, n_patches, P]
            units = torch.cat([sections.unsqueeze(2), patches.view(batch_size, n_sections, section_size, hidden)], 2)
            units = units + patch_positions  # [B, n_sections, 1 + Q, H]
            states, weights = self.patch_level(
                units.view(batch_size * n_sections, section_size + 1, hidden), masks.patch_keys, None, output_attentions
            )
            states = states.view(batch_size, n_sections, section_size + 1, hidden)
            sections = states[:, :, 0]
            patches = states[:, :, 1:].reshape(batch_size, n_patches, 1, hidden)
            tokens = torch.cat([patches, tokens[:, :, 1:]], dim=2)  # write the patch summaries back into the slots
            if output_attentions:
                extras["patch_attentions"] = weights.view(batch_size, n_sections, *weights.shape[1:])

        if self.section_level is not None:
            if self.section_pooling is not None:
                patches = tokens[:, :, 0].view(batch_size, n_sections, section_size, hidden)
                sections, pooling = self.section_pooling(patches, masks.patches.view(batch_size, n_sections, -1))
                if output_attentions:
                    extras["section_pooling_weights"] = pooling  # [B, n_sections, Q]
            if self.document_pooling is not None:
                document, pooling = self.document_pooling(sections, masks.sections)  # [B, H], [B, n_sections]
                if output_attentions:
                    extras["document_pooling_weights"] = pooling
            units = torch.cat([document.unsqueeze(1), sections], dim=1)  # [B, 1 + n_sections, H]
            states, weights = self.section_level(units, masks.section_keys, section_rotary, output_attentions)
            document, sections = states[:, 0], states[:, 1:]
            if output_attentions:
                extras["section_attentions"] = weights

        return tokens, sections, document, extras


class HierarchicalPreTrainedModel(PreTrainedModel):
    config_class = HierarchicalConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["HierarchicalEmbeddings", "HierarchicalLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, HierarchicalEmbeddings):
            for slot in (module.patch_slot, module.section_slot, module.document_slot):
                init.normal_(slot, mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, RotaryEmbedding):
            init.copy_(module.inv_freq, module.compute_inv_freq())


class HierarchicalModel(HierarchicalPreTrainedModel):
    """The bare hierarchical encoder: flat `input_ids` of any length in, token states and summaries out."""

    def __init__(self, config: HierarchicalConfig):
        super().__init__(config)
        config.validate()
        self.embeddings = HierarchicalEmbeddings(config)
        self.layers = nn.ModuleList(HierarchicalLayer(config, index) for index in range(config.num_hidden_layers))
        head_dim = config.hidden_size // config.num_attention_heads
        rotary = config.section_position_type == "rotary"
        self.section_rotary = RotaryEmbedding(head_dim, config.section_rope_theta) if rotary else None
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.word_embeddings = value

    def _check_inputs(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        token_type_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
    ) -> tuple[int, int]:
        shape = check_token_inputs(input_ids, inputs_embeds, self.config.vocab_size, self.config.hidden_size)
        if attention_mask is not None and tuple(attention_mask.shape) != shape:
            raise ValueError(
                f"`attention_mask` must have the shape of the input {shape}, got {tuple(attention_mask.shape)}."
            )
        if token_type_ids is not None:
            if tuple(token_type_ids.shape) != shape:
                raise ValueError(
                    f"`token_type_ids` must have the shape of the input {shape}, got {tuple(token_type_ids.shape)}."
                )
            if token_type_ids.min() < 0 or token_type_ids.max() >= self.config.type_vocab_size:
                raise ValueError(f"`token_type_ids` must lie in [0, type_vocab_size={self.config.type_vocab_size}).")
        return shape

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
    ) -> HierarchicalModelOutput:
        r"""
        input_ids (`[batch, seq_len]`): token ids, any `seq_len >= 1`.
        attention_mask (`[batch, seq_len]`, *optional*): 1 for tokens, 0 for padding (never attended to). Left and
            right padding give the same results: a row's blocks start at its first real token.
        token_type_ids (`[batch, seq_len]`, *optional*): BERT segment ids (default 0).
        inputs_embeds (`[batch, seq_len, hidden_size]`, *optional*): word embeddings to use instead of `input_ids`.
        output_attentions / output_hidden_states: return the per-level attentions / the token states of every layer.
        """
        config = self.config
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        batch_size, seq_len = self._check_inputs(input_ids, attention_mask, token_type_ids, inputs_embeds)
        device = (input_ids if input_ids is not None else inputs_embeds).device
        patch_size, section_size = config.patch_size, config.section_size

        # left padding: the blocks start at the first real token of each row, so the padding side changes nothing
        shifts = None
        if attention_mask is not None and not attention_mask[:, 0].all():
            shifts = attention_mask.bool().int().argmax(-1)  # [B]: leading padding of each row (0 if all padding)
            attention_mask = roll_rows(attention_mask, shifts)
            input_ids = None if input_ids is None else roll_rows(input_ids, shifts)
            inputs_embeds = None if inputs_embeds is None else roll_rows(inputs_embeds, shifts)
            token_type_ids = None if token_type_ids is None else roll_rows(token_type_ids, shifts)

        # flat [B, N] -> blocks [B, n_patches, P], padded to whole sections
        block = patch_size * section_size
        n_sections = -(-seq_len // block)
        n_patches = n_sections * section_size
        pad = n_sections * block - seq_len
        if attention_mask is None:
            attention_mask = torch.ones(batch_size, seq_len, dtype=torch.bool, device=device)
        token_mask = nn.functional.pad(attention_mask.bool(), (0, pad), value=False).view(batch_size, n_patches, -1)
        if token_type_ids is None:
            token_type_ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)
        token_type_ids = nn.functional.pad(token_type_ids, (0, pad)).view(batch_size, n_patches, patch_size)
        if inputs_embeds is None:
            pad_id = config.pad_token_id if config.pad_token_id is not None else 0
            input_ids = nn.functional.pad(input_ids, (0, pad), value=pad_id)
            inputs_embeds = self.embeddings.word_embeddings(input_ids)
        else:
            inputs_embeds = nn.functional.pad(inputs_embeds, (0, 0, 0, pad))
        inputs_embeds = inputs_embeds.view(batch_size, n_patches, patch_size, -1)

        masks = HierarchyMasks.from_token_mask(token_mask, section_size)
        tokens = self.embeddings(inputs_embeds, token_type_ids)  # [B, n_patches, 1 + P, H]
        dtype, hidden = tokens.dtype, tokens.shape[-1]
        sections = self.embeddings.section_slot.to(dtype).expand(batch_size, n_sections, hidden)
        document = self.embeddings.document_slot.to(dtype).expand(batch_size, hidden)
        patch_positions = self.embeddings.patch_position_embeddings.weight.to(dtype)  # [1 + Q, H]
        section_rotary = None
        if self.section_rotary is not None:
            section_rotary = self.section_rotary(torch.arange(n_sections + 1, device=device), dtype)

        def token_states(states: torch.Tensor) -> torch.Tensor:
            flat = states[:, :, 1:].reshape(batch_size, n_patches * patch_size, hidden)[:, :seq_len]
            return flat if shifts is None else roll_rows(flat, -shifts)  # back to the caller's positions

        all_hidden_states = [token_states(tokens)] if output_hidden_states else None
        collected: dict[str, list[torch.Tensor]] = {}
        for layer in self.layers:
            tokens, sections, document, extras = layer(
                tokens,
                sections,
                document,
                patch_positions,
                masks=masks,
                section_rotary=section_rotary,
                output_attentions=output_attentions,
            )
            for name, value in extras.items():
                collected.setdefault(name, []).append(value)
            if output_hidden_states:
                all_hidden_states.append(token_states(tokens))

        def gathered(name: str) -> tuple[torch.Tensor, ...] | None:
            return tuple(collected[name]) if name in collected else None

        return HierarchicalModelOutput(
            last_hidden_state=token_states(tokens),
            pooler_output=document,
            document_summary=document,
            patch_summaries=tokens[:, :, 0] * masks.patches.unsqueeze(-1).to(dtype),
            patch_mask=masks.patches,
            section_summaries=sections * masks.sections.unsqueeze(-1).to(dtype),
            section_mask=masks.sections,
            hidden_states=tuple(all_hidden_states) if output_hidden_states else None,
            token_attentions=gathered("token_attentions"),
            patch_attentions=gathered("patch_attentions"),
            section_attentions=gathered("section_attentions"),
            patch_pooling_weights=gathered("patch_pooling_weights"),
            section_pooling_weights=gathered("section_pooling_weights"),
            document_pooling_weights=gathered("document_pooling_weights"),
        )


class HierarchicalPooler(nn.Module):
    """BERT's pooler (dense + tanh), applied to the document summary."""

    def __init__(self, config: HierarchicalConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, document_summary: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(document_summary))


class HierarchicalLMHead(nn.Module):
    """BERT's masked-LM head: dense + activation + LayerNorm, then a decoder tied to the word embeddings."""

    def __init__(self, config: HierarchicalConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = ACT2FN[config.hidden_act]
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.layer_norm(self.activation(self.dense(hidden_states))))


def _classifier_dropout(config: HierarchicalConfig) -> nn.Dropout:
    rate = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
    return nn.Dropout(rate)


class HierarchicalForSequenceClassification(HierarchicalPreTrainedModel):
    """Document classification / regression from the document summary (`problem_type` as in `transformers`)."""

    accepts_loss_kwargs = False  # mean-reduced losses: Trainer must scale for gradient accumulation itself

    def __init__(self, config: HierarchicalConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = HierarchicalModel(config)
        self.pooler = HierarchicalPooler(config)
        self.dropout = _classifier_dropout(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
    ) -> HierarchicalHeadOutput:
        r"""
        labels (`[batch]` long for single-label, `[batch, num_labels]` float for multi-label/regression, *optional*).
        """
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            inputs_embeds=inputs_embeds,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        logits = self.classifier(self.dropout(self.pooler(outputs.document_summary)))  # [B, num_labels]
        loss = None
        if labels is not None:
            loss = self.loss_function(labels=labels, pooled_logits=logits, config=self.config)
        return HierarchicalHeadOutput.from_base(outputs, logits, loss)


class HierarchicalForMaskedLM(HierarchicalPreTrainedModel):
    """Masked-language-model pretraining head over the token states (decoder tied to the word embeddings)."""

    _tied_weights_keys = {"lm_head.decoder.weight": "model.embeddings.word_embeddings.weight"}

    def __init__(self, config: HierarchicalConfig):
        super().__init__(config)
        self.model = HierarchicalModel(config)
        self.lm_head = HierarchicalLMHead(config)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head.decoder

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head.decoder = new_embeddings

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        logits_to_keep: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        **loss_kwargs,
    ) -> HierarchicalHeadOutput:
        r"""
        labels (`[batch, seq_len]`, *optional*): token ids to predict, -100 where no prediction is scored.
        logits_to_keep (`[batch, seq_len]` bool, *optional*): project only these positions onto the vocabulary, e.g.
            `labels != -100` in pretraining (the projection is about half of a MiniLM-size model's compute). `logits`
            is then `[num_kept, vocab_size]`, in row-major order of the kept positions, and the loss is over them.
        loss_kwargs: `num_items_in_batch` (from `Trainer`) for exact gradient accumulation.
        """
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            inputs_embeds=inputs_embeds,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        hidden_states = outputs.last_hidden_state  # [B, N, H]
        if logits_to_keep is not None:
            if logits_to_keep.shape != hidden_states.shape[:2] or logits_to_keep.dtype != torch.bool:
                raise ValueError(f"`logits_to_keep` must be a bool tensor of shape {tuple(hidden_states.shape[:2])} "
                                 f"(batch, seq_len), got {logits_to_keep.dtype} {tuple(logits_to_keep.shape)}.")
            hidden_states = hidden_states[logits_to_keep]  # [num_kept, H]
            labels = None if labels is None else labels[logits_to_keep]
        logits = self.lm_head(hidden_states)  # [B, N, vocab_size], or [num_kept, vocab_size]
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **loss_kwargs)
        return HierarchicalHeadOutput.from_base(outputs, logits, loss)


class HierarchicalForTokenClassification(HierarchicalPreTrainedModel):
    """Token tagging over the (document-aware) token states."""

    def __init__(self, config: HierarchicalConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = HierarchicalModel(config)
        self.dropout = _classifier_dropout(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        **loss_kwargs,
    ) -> HierarchicalHeadOutput:
        r"""
        labels (`[batch, seq_len]`, *optional*): class ids, -100 where no prediction is scored (e.g. padding).
        loss_kwargs: `num_items_in_batch` (from `Trainer`) for exact gradient accumulation.
        """
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            inputs_embeds=inputs_embeds,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        logits = self.classifier(self.dropout(outputs.last_hidden_state))  # [B, N, num_labels]
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.config, **loss_kwargs)
        return HierarchicalHeadOutput.from_base(outputs, logits, loss)


__all__ = [
    "HierarchicalPreTrainedModel",
    "HierarchicalModel",
    "HierarchicalForSequenceClassification",
    "HierarchicalForMaskedLM",
    "HierarchicalForTokenClassification",
    "HierarchicalModelOutput",
    "HierarchicalHeadOutput",
]
