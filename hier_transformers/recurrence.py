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


def iter_segments(input_ids: torch.Tensor, segment_length: int) -> Iterator[torch.Tensor]:
    """Yield consecutive [batch, <= segment_length] slices of `input_ids` [batch, length]."""
    if segment_length < 1:
        raise ValueError(f"`segment_length` must be >= 1, got {segment_length}.")
    if input_ids.dim() != 2:
        raise ValueError(f"`input_ids` must be [batch, length], got shape {tuple(input_ids.shape)}.")
    yield from input_ids.split(segment_length, dim=1)


def segment_lm_step(
    model: nn.Module,
    input_ids: torch.Tensor,
    segment_length: int,
    cache: HierarchicalXLCache | None = None,
    backward: Callable[[torch.Tensor], None] | None = None,
    labels: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    resets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int, HierarchicalXLCache]:
    """Run a causal LM over `input_ids` segment by segment with a detached cache.

    By default each position predicts the next token of `input_ids`, across segment boundaries (the last position of a
    segment predicts the first token of the next one; the very last position predicts nothing). `labels`
    [batch, length] instead gives each position's target directly (-100 = none), `attention_mask` [batch, length]
    marks real tokens (padding only at a row's end) and `resets` [batch, num_segments] (bool) restarts a row's memory
    before a segment — how Transformer-XL stream training starts a new document in one row. For every segment,
    `backward` (e.g. `torch.Tensor.backward` or `accelerator.backward`) is called on that segment's share of the MEAN
    loss, so the accumulated gradients are those of the mean over all predictions. Returns (summed loss, detached;
    number of predictions; the detached cache after the last segment).
    """
    if labels is None:
        if input_ids.shape[1] < 2 and cache is None:
            raise ValueError("`input_ids` needs at least 2 tokens to have a next-token target.")
        labels = nn.functional.pad(input_ids[:, 1:], (0, 1), value=-100)  # [B, L]: the next token, none at the end
    num_predictions = int((labels != -100).sum())
    if cache is None:
        cache = HierarchicalXLCache(getattr(model, "module", model).config)  # DDP-wrapped models too
    loss_sum = torch.zeros((), device=input_ids.device)
    start = 0
    for index, segment in enumerate(iter_segments(input_ids, segment_length)):
        if resets is not None and cache.seen is not None and bool(resets[:, index].any()):
            cache.reset_rows(resets[:, index])
        columns = slice(start, start + segment.shape[1])
        mask = attention_mask[:, columns] if attention_mask is not None else None
        logits = model(input_ids=segment, attention_mask=mask, cache=cache, use_cache=True).logits  # [B, L, vocab]
        loss = nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), labels[:, columns].reshape(-1), reduction="sum"
        )  # -100 targets are ignored
        if backward is not None and loss.requires_grad:
            backward(loss / max(num_predictions, 1))
        loss_sum = loss_sum + loss.detach()
        cache = cache.detached()
        start += segment.shape[1]
    return loss_sum, num_predictions, cache
