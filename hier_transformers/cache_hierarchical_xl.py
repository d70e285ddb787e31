"""Bounded generation / segment-recurrence cache of the HierarchicalXL decoder.

Per layer the cache holds (batch first, every row right-aligned on its own positions):

- `token_keys` / `token_values` [batch, heads, local_window - 1, head_dim]: the most recent tokens (keys rotated);
- `patch_keys` / `patch_values` [batch, heads, patch_memory, head_dim]: the most recent completed patch summaries;
- `section_keys` / `section_values` [batch, heads, section_memory, head_dim]: the most recent section summaries;
- `pool_max` / `pool_sum` [batch], `pool_acc` [batch, hidden] (fp32): the online softmax state (running max,
  denominator, weighted sum) of the unfinished patch's attention pooling, so its summary is exact when it completes.

Which slot holds which position is implied by `seen` (real tokens per row): slot `i` of the token memory is position
`seen - (local_window - 1) + i` (negative = empty), and likewise for patches and sections. The size stops growing once
the bounds are reached, however long the stream runs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.cache_utils import Cache

from .configuration_hierarchical_xl import HierarchicalXLConfig


class HierarchicalXLCacheLayer:
    """The memory of one decoder layer: a dict of batch-first tensors, empty until the first forward."""

    is_compileable = False
    is_croppable = False
    is_sliding = False
    supports_early_init = False

    def __init__(self):
        self.state: dict[str, torch.Tensor] = {}

    @property
    def is_initialized(self) -> bool:
        return bool(self.state)

    @property
    def batch_size(self) -> int:
        return self.state["pool_sum"].shape[0] if self.state else -1

    def apply(self, function: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.state = {name: function(tensor) for name, tensor in self.state.items()}

    def reset(self) -> None:
        self.state = {}


class HierarchicalXLCache(Cache):
    """Bounded memory for [`HierarchicalXLModel`]: a window of recent tokens plus patch and section summaries.

    `generate()` creates one automatically. For segment-by-segment processing pass it back in:

    ```python
    cache = HierarchicalXLCache(model.config)
    for segment in input_ids.split(512, dim=1):
        out = model(segment, cache=cache, use_cache=True)
        cache = out.cache
    ```

    `get_seq_length()` counts the input columns processed so far (padding included, as `generate` expects);
    `seen` holds the number of real tokens per row. Use `detached()` between segments for truncated BPTT.
    """

    def __init__(self, config: HierarchicalXLConfig):
        super().__init__(layers=[HierarchicalXLCacheLayer() for _ in range(config.num_hidden_layers)])
        self.config = config
        self.columns = 0
        self.seen: torch.Tensor | None = None  # [batch] long: real tokens per row
        self.closed: torch.Tensor | None = None  # [batch] bool: row ended with (right) padding

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Input columns processed so far (padding included)."""
        return self.columns

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1  # no maximum sequence length: the memory is bounded, the stream is not

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.columns + query_length, 0

    def advance(self, num_real: torch.Tensor, num_columns: int, closes: torch.Tensor) -> None:
        """Record that a forward consumed `num_columns` columns holding `num_real` [batch] real tokens."""
        if self.seen is None:
            self.seen = torch.zeros_like(num_real)
            self.closed = torch.zeros_like(closes)
        self.seen = self.seen + num_real
        self.closed = self.closed | closes
        self.columns += num_columns

    def _apply_to_rows(self, function: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for layer in self.layers:
            layer.apply(function)
        if self.seen is not None:
            self.seen = function(self.seen)
            self.closed = function(self.closed)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the rows for beam search."""
        self._apply_to_rows(lambda tensor: tensor.index_select(0, beam_idx.to(tensor.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply_to_rows(lambda tensor: tensor.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply_to_rows(lambda tensor: tensor[indices])

    def crop(self, tokens_to_remove: int) -> None:
        """Only `crop(0)` (a no-op: the memory is always minimal) is possible; summaries cannot be un-folded."""
        if tokens_to_remove != 0:
            raise ValueError(
                "HierarchicalXLCache cannot remove tokens: the tokens that left its window only survive inside "
                "patch and section summaries. Re-run the prefix instead."
            )

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()
        self.columns, self.seen, self.closed = 0, None, None

    def detached(self) -> HierarchicalXLCache:
        """A copy whose tensors are cut from the autograd graph (truncated BPTT between segments)."""
        copy = HierarchicalXLCache(self.config)
        copy.columns = self.columns
        copy.seen, copy.closed = self.seen, self.closed
        for source, target in zip(self.layers, copy.layers):
            target.state = {name: tensor.detach() for name, tensor in source.state.items()}
        return copy

    def nbytes(self) -> int:
        """Bytes held by the cache tensors (what the benchmarks report)."""
        tensors = [tensor for layer in self.layers for tensor in layer.state.values()]
        tensors += [tensor for tensor in (self.seen, self.closed) if tensor is not None]
        return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


__all__ = ["HierarchicalXLCache"]
