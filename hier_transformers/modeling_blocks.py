"""Building blocks shared by both model families (encoder `hierarchical`, decoder `hierarchical_xl`).

Every attention in this package goes through :class:`MultiHeadAttention`, so `attn_implementation`
("eager" / "sdpa") is honoured the same way at every level of the hierarchy.

Mask convention: attention masks are **boolean**, ``True`` where a query may attend to a key, with a
shape that broadcasts to ``[batch, heads, queries, keys]``. Callers must guarantee that every query row
has at least one allowed key (a summary slot or the token itself): SDPA returns NaN for an all-False row.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.configuration_utils import PreTrainedConfig


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention that also returns the weights. Shapes: q [B, h, Q, d], k/v [B, h, K, d]."""
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # [B, h, Q, K]
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()  # [B, Q, h, d]
    return output, weights


def check_token_inputs(
    input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None, vocab_size: int, hidden_size: int
) -> tuple[int, int]:
    """Validate `input_ids` [batch, seq_len] (integer ids in [0, vocab_size)) or `inputs_embeds`
    [batch, seq_len, hidden_size]: exactly one of them, batch >= 1, seq_len >= 1. Returns (batch, seq_len)."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
    if input_ids is not None:
        if input_ids.dim() != 2:
            raise ValueError(f"`input_ids` must be [batch, seq_len], got shape {tuple(input_ids.shape)}.")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise ValueError(f"`input_ids` must hold integer token ids, got dtype {input_ids.dtype}.")
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= vocab_size):
            raise ValueError(
                f"`input_ids` must lie in [0, vocab_size={vocab_size}), got values in "
                f"[{int(input_ids.min())}, {int(input_ids.max())}]."
            )
        shape = tuple(input_ids.shape)
    else:
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != hidden_size:
            raise ValueError(
                f"`inputs_embeds` must be [batch, seq_len, hidden_size={hidden_size}], got shape "
                f"{tuple(inputs_embeds.shape)}."
            )
        shape = tuple(inputs_embeds.shape[:2])
    if shape[0] == 0:
        raise ValueError("The batch is empty: `input_ids` / `inputs_embeds` need at least one row (batch >= 1).")
    if shape[1] == 0:
        raise ValueError(
            "`input_ids` / `inputs_embeds` must hold at least one token (seq_len >= 1); a decoder generating from an "
            "empty prompt starts from the BOS token."
        )
    return shape


class MultiHeadAttention(nn.Module):
    """Multi-head attention with separate q/k/v/o projections.

    `project` and `attend` are exposed separately so that callers can rotate keys, prepend cached keys or
    summary keys before attending (the decoder does); `forward` is the plain self-attention path.
    """

    def __init__(self, config: PreTrainedConfig, is_causal: bool = False):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.num_key_value_groups = 1  # read by transformers' attention interfaces
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = is_causal  # our masks are explicit; this only stops SDPA from assuming causality
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=bias)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=bias)

    def split_heads(self, states: torch.Tensor) -> torch.Tensor:
        # [B, S, hidden] -> [B, heads, S, head_dim]
        return states.view(*states.shape[:-1], self.num_heads, self.head_dim).transpose(1, 2)

    def project(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, S, hidden] -> query, key, value, each [B, heads, S, head_dim]."""
        return (
            self.split_heads(self.q_proj(hidden_states)),
            self.split_heads(self.k_proj(hidden_states)),
            self.split_heads(self.v_proj(hidden_states)),
        )

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """q [B, h, Q, d], k/v [B, h, K, d], boolean mask -> output [B, Q, hidden], weights [B, h, Q, K] or None."""
        implementation = "eager" if output_attentions else self.config._attn_implementation
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        output, weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            is_causal=False,
        )
        output = self.o_proj(output.reshape(*output.shape[:-2], -1))  # [B, Q, hidden]
        return output, (weights if output_attentions else None)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        query, key, value = self.project(hidden_states)
        return self.attend(query, key, value, attention_mask, output_attentions)


class FeedForward(nn.Module):
    """Position-wise MLP: up projection, activation, down projection."""

    def __init__(self, config: PreTrainedConfig):
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act_fn = ACT2FN[config.hidden_act]
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.up_proj(hidden_states)))


class RotaryEmbedding(nn.Module):
    """RoPE over arbitrary (unbounded) integer positions: there is no position table to run past."""

    inv_freq: torch.Tensor

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self) -> torch.Tensor:
        """The inverse frequencies [head_dim // 2]. `from_pretrained` leaves non-persistent buffers uninitialised,
        so `_init_weights` must refill `inv_freq` with this."""
        return 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))

    @torch.no_grad()
    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [..., S] (int) -> cos, sin [..., S, head_dim] in `dtype` (computed in fp32)."""
        angles = positions.to(torch.float32).unsqueeze(-1) * self.inv_freq.to(positions.device)
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [B, heads, S, d] by cos/sin of shape [B, S, d] (or [S, d])."""
    if cos.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = states.shape[-1] // 2
    rotated = torch.cat((-states[..., half:], states[..., :half]), dim=-1)
    return states * cos + rotated * sin


class AttentionPooling(nn.Module):
    """HAN-style pooling: one learned score per member, softmax over the members of a unit, weighted sum."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.score = nn.Linear(hidden_size, 1)

    def forward(self, members: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """members [..., L, hidden], mask [..., L] (bool) -> pooled [..., hidden], weights [..., L].

        A unit with no valid member pools to zeros (its weights are all zero), never NaN.
        """
        scores = self.score(members).squeeze(-1).float()  # [..., L]
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores, dim=-1) * mask
        pooled = torch.einsum("...l,...lh->...h", weights.to(members.dtype), members)
        return pooled, weights.to(members.dtype)
