"""Truncated back-propagation through time for HierarchicalXL (Transformer-XL-style segment training).

A long sequence is cut into segments; each segment attends to the memory (cache) left by the previous ones, but
gradients stop at the segment boundary: the cache is carried DETACHED.

```python
import torch
from hier_transformers import HierarchicalXLConfig, HierarchicalXLForCausalLM, segment_lm_step

model = HierarchicalXLForCausalLM(HierarchicalXLConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                                       intermediate_size=128, patch_size=8, local_window=32))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
input_ids = torch.randint(4, 260, (4, 1024))  # [batch, long_length]
loss_sum, n_tokens, cache = segment_lm_step(model, input_ids, segment_length=256, backward=torch.Tensor.backward)
optimizer.step()
optimizer.zero_grad()
print(loss_sum / n_tokens)  # mean next-token loss over the whole sequence
```

The gradient accumulated this way is the gradient of the mean loss over all `batch * (length - 1)` predictions,
with the memory treated as a constant in each segment. Pass the returned `cache` to the next call to continue a
stream (e.g. consecutive chunks of one document).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from .cache_hierarchical_xl import HierarchicalXLCache
from .configuration_hierarchical_xl import HierarchicalXLConfig
from .modeling_hierarchical_xl import visible_ranges


def iter_segments(input_ids: torch.Tensor, segment_length: int) -> Iterator[torch.Tensor]:
    """Yield consecutive [batch, <= segment_length] slices of `input_ids` [batch, length]."""
    if segment_length < 1:
        raise ValueError(f"`segment_length` must be >= 1, got {segment_length}.")
    if input_ids.dim() != 2:
        raise ValueError(f"`input_ids` must be [batch, length], got shape {tuple(input_ids.shape)}.")
    yield from input_ids.split(segment_length, dim=1)


def copy_sources(
    tokens: torch.Tensor, config: HierarchicalXLConfig, match: int, offset: int = 0, first: int = 0
) -> torch.Tensor:
    """Where each query should look to copy its next token: targets for `retrieval_labels`, from the text alone.

    `tokens` [n] are consecutive tokens of one document, at positions `offset .. offset + n - 1` (counted from the
    document's first token, as the memory counts them). For each position `t` from index `first` on, the label is
    `s + 1`, the token right after the most recent earlier occurrence `s` of the `match` tokens ending at `t`
    (an induction head's source: what followed the same context last time), when that token's patch is selectable for
    `t` (outside the local window, inside the retrieval window); -100 when there is none. Occurrences are compared by
    a 64-bit polynomial hash of the `match` tokens. -> [n - first] labels (positions).
    """
    if tokens.dim() != 1:
        raise ValueError(f"`tokens` must be one document's tokens [n], got shape {tuple(tokens.shape)}.")
    if not isinstance(match, int) or match < 1:
        raise ValueError(f"`match` must be an integer >= 1 (tokens of context that must repeat), got {match!r}.")
    count = tokens.shape[0]
    labels = torch.full((max(count - first, 0),), -100, dtype=torch.long)
    if count - first <= 0 or count < match:
        return labels
    powers = torch.tensor([pow(1_000_003, i, 2**61 - 1) for i in range(match)], dtype=torch.long)
    hashes = (tokens.long().unfold(0, match, 1) * powers).sum(-1)  # [n - match + 1]: context ending at index match-1+i
    ends = torch.arange(match - 1, count)  # index of each context's last token
    queries = torch.arange(max(first, match - 1), count)  # not empty: first < count and match <= count
    positions = offset + queries
    lo, hi = visible_ranges(positions, config)["selectable"]  # [q] patch ranges
    source = offset + ends + 1  # the position each earlier context would send the query to
    same = hashes[queries - match + 1, None] == hashes[None, :]  # [q, n - match + 1]
    patch = torch.div(source, config.patch_size, rounding_mode="floor")[None, :]
    allowed = same & (ends[None, :] < queries[:, None]) & (patch >= lo[:, None]) & (patch < hi[:, None])
    newest = torch.where(allowed, ends[None, :], -1).amax(dim=1)  # [q] the most recent occurrence, -1 = none
    labels[queries - first] = torch.where(newest >= 0, offset + newest + 1, -100)
    return labels


def segment_lm_step(
    model: nn.Module,
    input_ids: torch.Tensor,
    segment_length: int,
    cache: HierarchicalXLCache | None = None,
    backward: Callable[[torch.Tensor], None] | None = None,
    labels: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    resets: torch.Tensor | None = None,
    retrieval_labels: torch.Tensor | None = None,
    retrieval_weight: float = 1.0,
) -> tuple[torch.Tensor, int, HierarchicalXLCache]:
    """Run a causal LM over `input_ids` segment by segment with a detached cache.

    By default each position predicts the next token of `input_ids`, across segment boundaries (the last position of a
    segment predicts the first token of the next one; the very last position predicts nothing). `labels`
    [batch, length] instead gives each position's target directly (-100 = none), `attention_mask` [batch, length]
    marks real tokens (padding only at a row's end) and `resets` [batch, num_segments] (bool) restarts a row's memory
    before a segment — how Transformer-XL stream training starts a new document in one row. For every segment,
    `backward` (e.g. `torch.Tensor.backward` or `accelerator.backward`) is called on that segment's share of the MEAN
    loss, so the accumulated gradients are those of the mean over all predictions. `retrieval_labels` [batch, length]
    (see `HierarchicalXLModel.forward`, e.g. from `copy_sources`) add `retrieval_weight` times the mean selection loss
    over all of their supervised queries and layers to that objective. Returns (summed language-model loss, detached;
    number of predictions; the detached cache after the last segment).
    """
    if labels is None:
        if input_ids.shape[1] < 2 and cache is None:
            raise ValueError("`input_ids` needs at least 2 tokens to have a next-token target.")
        labels = nn.functional.pad(input_ids[:, 1:], (0, 1), value=-100)  # [B, L]: the next token, none at the end
    num_predictions = int((labels != -100).sum())
    num_selections = 0  # supervised queries of the whole call (each segment's mean loss weighs by its share)
    if retrieval_labels is not None:
        supervised = retrieval_labels != -100
        if attention_mask is not None:
            supervised = supervised & attention_mask.bool().to(retrieval_labels.device)
        num_selections = int(supervised.sum())
    if cache is None:
        cache = HierarchicalXLCache(getattr(model, "module", model).config)  # DDP-wrapped models too
    loss_sum = torch.zeros((), device=input_ids.device)
    start = 0
    for index, segment in enumerate(iter_segments(input_ids, segment_length)):
        if resets is not None and cache.seen is not None and bool(resets[:, index].any()):
            cache.reset_rows(resets[:, index])
        columns = slice(start, start + segment.shape[1])
        mask = attention_mask[:, columns] if attention_mask is not None else None
        extra = {"retrieval_labels": retrieval_labels[:, columns]} if retrieval_labels is not None else {}
        outputs = model(input_ids=segment, attention_mask=mask, cache=cache, use_cache=True, **extra)
        logits = outputs.logits  # [B, L, vocab]
        loss = nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), labels[:, columns].reshape(-1), reduction="sum"
        )  # -100 targets are ignored
        objective = loss / max(num_predictions, 1)
        if num_selections:
            share = int(supervised[:, columns].sum()) / num_selections
            objective = objective + retrieval_weight * share * outputs.retrieval_loss
        if backward is not None and objective.requires_grad:
            backward(objective)
        loss_sum = loss_sum + loss.detach()
        cache = cache.detached()
        start += segment.shape[1]
    return loss_sum, num_predictions, cache
