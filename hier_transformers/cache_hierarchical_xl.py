"""Bounded generation / segment-recurrence cache of the HierarchicalXL decoder.

Each decoder layer owns one [`HierarchicalXLCacheLayer`]. It keeps, batch first (every row right-aligned on its own
positions), the *cached slots* of three kinds of keys and values, `[batch, heads, cached_slots(config)[kind], head_dim]`:

- `"tokens"`: the `config.token_memory` most recent tokens (keys rotated at their positions): `local_window - 1`, or
  `retrieval_window - 1` with retrieval on;
- `"patches"`: the most recent completed patch summaries (`config.summary_memory`: `patch_memory`, or with retrieval
  on also every patch that can still be selected, then with keys before RoPE: the selection reads them so);
- `"sections"` (only with sections): the most recent section summaries (`config.section_memory`);

plus the online softmax state of the unfinished patch's attention pooling (`pool_max` / `pool_sum` [batch],
`pool_acc` [batch, hidden], fp32), so its summary is exact when the patch completes, and with `key_shift` the last
token's key before the shift and RoPE (`last_key` [batch, heads, head_dim]), which the next token's key carries.

Which slot holds which absolute index (token position, patch index, section index) is implied by `seen` (real tokens
per row), in one of two layouts:

- without retrieval, a *sliding buffer*: slot `i` of `slots` holds the `slots - i`-th newest index (for the tokens,
  position `seen - (local_window - 1) + i`; negative = empty); each forward replaces it by the newest slots;
- with retrieval on, a *ring buffer*: index `a` lives in slot `ring_slot(a, slots) = a mod slots`; each forward writes
  only its new entries, in place, so a decode step moves O(window + top_k * patch_size) keys, not the whole
  `retrieval_window` (the forward reads the local window and the chosen patches' tokens by index).

The size stops growing once the bounds are reached, however long the stream runs. The attention reads the cached
slots with `cache_layer.cached(kind)` and stores the next ones with `cache_layer.update(...)`, as `transformers`'
caches do.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.cache_utils import Cache

from .configuration_hierarchical_xl import HierarchicalXLConfig

POOLING_STATE = ("pool_max", "pool_sum", "pool_acc")
CARRIED_STATE = (*POOLING_STATE, "last_key")  # carried from one forward to the next (last_key: with key_shift)
# The config fields the cached tensors depend on: a cache filled under other values is refused.
CACHE_LAYOUT_FIELDS = (
    "patch_size",
    "local_window",
    "max_patch_summaries",
    "section_size",
    "max_section_summaries",
    "num_hidden_layers",
    "num_attention_heads",
    "hidden_size",
)


def cached_slots(config: HierarchicalXLConfig) -> dict[str, int]:
    """Slots per kind of key (`"tokens"`, `"patches"`, `"sections"`) that one cache layer keeps."""
    slots = {"tokens": config.token_memory, "patches": config.summary_memory}
    if config.section_size is not None:
        slots["sections"] = config.section_memory
    return slots


def cache_layout(config: HierarchicalXLConfig) -> dict[str, int | None]:
    """The values of `CACHE_LAYOUT_FIELDS` in `config`, plus `retrieval_window` when retrieval is on (a cache
    without retrieval has exactly the layout it always had)."""
    layout = {name: getattr(config, name) for name in CACHE_LAYOUT_FIELDS}
    if config.retrieval_top_k > 0:
        layout["retrieval_window"] = config.retrieval_window
        # 2: slot = index mod slots, patch summary keys before RoPE (states of older layouts are refused)
        layout["ring_buffer"] = 2
    if config.key_shift:
        layout["key_shift"] = 1  # the layers carry `last_key`
    return layout


def window_slots(config: HierarchicalXLConfig) -> dict[str, int]:
    """Slots per kind that the block-local attention reads from the cache: the local window's tokens and the summary
    windows (all of `cached_slots` without retrieval; with retrieval the rest of the ring is only read by index)."""
    slots = {"tokens": config.local_window - 1, "patches": config.patch_memory}
    if config.section_size is not None:
        slots["sections"] = config.section_memory
    return slots


def ring_slot(index: torch.Tensor, slots: int) -> torch.Tensor:
    """The ring-buffer slot of absolute index `index` (any shape, negative = empty) in a kind with `slots` slots."""
    return index.remainder(slots)


def slot_rows(states: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """The rows of `states` [B, heads, T, d] viewed as [B * heads * T, d] that `slots` [B, ..., K] name, per head
    -> [B, ..., heads, K]."""
    batch, heads, total, _ = states.shape
    head_rows = torch.arange(batch * heads, device=slots.device).view(batch, *[1] * (slots.dim() - 2), heads, 1)
    return head_rows * total + slots.unsqueeze(-2)


def gather_slots(states: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """states [B, heads, T, d], slots [B, ..., K] (per row, optionally per block) -> [B, ..., heads, K, d]. Copies
    whole rows of `d` values (one index per row, not per value)."""
    rows = slot_rows(states, slots)  # [B, ..., heads, K]
    return states.reshape(-1, states.shape[-1]).index_select(0, rows.flatten()).view(*rows.shape, states.shape[-1])


class HierarchicalXLCacheLayer:
    """The memory of one decoder layer: cached key/value slots per kind plus the pooling state, empty until the first
    forward allocates them (`lazy_initialization`)."""

    is_compileable = False
    is_croppable = False
    is_sliding = False
    supports_early_init = False

    def __init__(self, slots: dict[str, int], key_shift: bool = False):
        self.slots = slots  # cached slots per kind
        self.key_shift = key_shift
        self.keys: dict[str, torch.Tensor] = {}  # kind -> [B, heads, slots[kind], head_dim]
        self.values: dict[str, torch.Tensor] = {}
        self.pooling: dict[str, torch.Tensor] = {}  # CARRIED_STATE -> [B] / [B, hidden] (fp32), [B, heads, head_dim]

    @property
    def is_initialized(self) -> bool:
        return bool(self.pooling)

    @property
    def batch_size(self) -> int:
        return self.pooling["pool_sum"].shape[0] if self.pooling else -1

    def lazy_initialization(self, hidden_states: torch.Tensor, num_heads: int, head_dim: int) -> None:
        """Allocate empty slots for the rows of `hidden_states` [B, S, hidden] (its dtype and device)."""
        batch, _, hidden = hidden_states.shape
        for kind, slots in self.slots.items():
            self.keys[kind] = hidden_states.new_zeros(batch, num_heads, slots, head_dim)
            self.values[kind] = hidden_states.new_zeros(batch, num_heads, slots, head_dim)
        self.pooling = {
            "pool_max": hidden_states.new_zeros(batch, dtype=torch.float32),
            "pool_sum": hidden_states.new_zeros(batch, dtype=torch.float32),
            "pool_acc": hidden_states.new_zeros(batch, hidden, dtype=torch.float32),
        }
        if self.key_shift:
            self.pooling["last_key"] = hidden_states.new_zeros(batch, num_heads, head_dim)

    def cached(self, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached (keys, values) of one kind, each [B, heads, slots[kind], head_dim]."""
        return self.keys[kind], self.values[kind]

    def update(
        self,
        extended: dict[str, tuple[torch.Tensor, torch.Tensor]],
        carry: dict[str, torch.Tensor],
        pooling: dict[str, torch.Tensor],
        ring_index: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Store the next memory from the extended (cached + new) keys/values of each kind [B, heads, T, d], and the
        carried state (`CARRIED_STATE`: the pooling of the patch left unfinished, the last key).

        Sliding buffer (`ring_index` None): the cache becomes the extended slots `carry[kind]` [B, slots[kind]].
        Ring buffer: the entries of absolute indices `ring_index[kind]` [B, n] (n <= slots, distinct slots) are
        written in place at their ring slots, from the extended slots `carry[kind]` [B, n] (-1 = keep the entry)."""
        for kind, (keys, values) in extended.items():
            if ring_index is None:
                self.keys[kind] = gather_slots(keys, carry[kind])
                self.values[kind] = gather_slots(values, carry[kind])
                continue
            slots = ring_slot(ring_index[kind], self.slots[kind])  # [B, n]
            keep = (carry[kind] < 0)[:, None, :, None]
            for store, states in ((self.keys, keys), (self.values, values)):
                ring = store[kind]
                written = torch.where(keep, gather_slots(ring, slots), gather_slots(states, carry[kind].clamp_min(0)))
                index = slots[:, None, :, None].expand_as(written)
                # while autograd records (training), the ring this forward read (its summaries as they lie, a view)
                # may be needed for the backward: a new ring; under no_grad (generation, evaluation) in place
                write = ring.scatter if torch.is_grad_enabled() else ring.scatter_
                store[kind] = write(2, index, written)
        self.pooling = dict(pooling)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the layer by a flat name (`tokens.keys`, ..., `pool_acc`)."""
        named = {f"{kind}.keys": tensor for kind, tensor in self.keys.items()}
        named |= {f"{kind}.values": tensor for kind, tensor in self.values.items()}
        return named | self.pooling

    def load_tensors(self, named: dict[str, torch.Tensor]) -> None:
        """Inverse of `tensors()` (an empty dict empties the layer)."""
        self.keys = {kind: named[f"{kind}.keys"] for kind in self.slots if f"{kind}.keys" in named}
        self.values = {kind: named[f"{kind}.values"] for kind in self.slots if f"{kind}.values" in named}
        self.pooling = {name: named[name] for name in CARRIED_STATE if name in named}

    def apply(self, function: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.load_tensors({name: function(tensor) for name, tensor in self.tensors().items()})

    def reset(self) -> None:
        self.keys, self.values, self.pooling = {}, {}, {}


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
    `seen` holds the number of real tokens per row. Use `detached()` between segments for truncated BPTT,
    `reset_rows(rows)` when rows of a stream batch start a new document, and `state_dict()` / `load_state_dict()`
    to save a cache (plain tensors, safetensors-compatible).

    The cache records the config fields its tensors depend on (`CACHE_LAYOUT_FIELDS`); a model with other values
    refuses it. A model from the package and the same model loaded with `trust_remote_code=True` accept each other's
    caches: they are recognised by `is_hierarchical_xl_cache`, not by their class.
    """

    is_hierarchical_xl_cache = True  # the models check this marker, not the class (remote code defines its own)

    def __init__(self, config: HierarchicalXLConfig):
        slots = cached_slots(config)
        super().__init__(
            layers=[HierarchicalXLCacheLayer(slots, config.key_shift) for _ in range(config.num_hidden_layers)]
        )
        self.config = config
        self.layout = cache_layout(config)
        self.columns = 0
        self.seen: torch.Tensor | None = None  # [batch] long: real tokens per row
        self.closed: torch.Tensor | None = None  # [batch] bool: row ended with (right) padding

    def check_layout(self, config: HierarchicalXLConfig) -> None:
        """Raise `ValueError` naming every field in which `config` differs from the config this cache was made for."""
        expected = cache_layout(config)
        names = list(expected) + [name for name in self.layout if name not in expected]
        different = {
            name: (self.layout.get(name), expected.get(name))
            for name in names
            if self.layout.get(name) != expected.get(name)
        }
        if different:
            listed = ", ".join(f"{name}: cache {ours!r} vs model {theirs!r}" for name, (ours, theirs) in different.items())
            raise ValueError(
                f"This HierarchicalXLCache was made for a config with other values ({listed}); its slots mean "
                "something else to this model. Create a new cache with `HierarchicalXLCache(model.config)`."
            )

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

    def reset_rows(self, rows: torch.Tensor) -> None:
        """Rows marked True in `rows` [batch] (bool) start a new document: their memory becomes exactly that of a
        fresh cache (nothing seen, nothing visible); the other rows are untouched. For stream training, where each
        batch row is an independent stream. A no-op on a cache that has not run yet."""
        if self.seen is None:
            return
        if rows.dtype != torch.bool or rows.shape != self.seen.shape:
            raise ValueError(
                f"`rows` must be a bool tensor of shape [batch] = {tuple(self.seen.shape)}, got {rows.dtype} of "
                f"shape {tuple(rows.shape)}."
            )
        rows = rows.to(self.seen.device)

        def reset(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.masked_fill(rows.view(-1, *[1] * (tensor.dim() - 1)), 0)

        for layer in self.layers:
            layer.apply(reset)
        self.seen = reset(self.seen)
        self.closed = reset(self.closed)

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
        """A copy whose tensors are cut from the autograd graph (truncated BPTT between segments). With retrieval
        on it shares the ring buffers with this cache (no copy of the retrieval window): continue only the copy."""
        copy = type(self)(self.config)
        copy.load_state_dict({name: tensor.detach() for name, tensor in self.state_dict().items()})
        return copy

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor of the cache by a flat name, plain tensors only (write it with `safetensors`): `columns`,
        `layout.<field>`, and once the cache has run `seen`, `closed` and `layers.<i>.<kind>.keys` / `.values` /
        `layers.<i>.pool_*`. The tensors are the cache's own, not copies."""
        state = {"columns": torch.tensor(self.columns, dtype=torch.long)}
        state |= {f"layout.{name}": torch.tensor(-1 if value is None else value) for name, value in self.layout.items()}
        if self.seen is not None:
            state |= {"seen": self.seen, "closed": self.closed}
        for index, layer in enumerate(self.layers):
            state |= {f"layers.{index}.{name}": tensor for name, tensor in layer.tensors().items()}
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore a `state_dict()` (refused with a `ValueError` if it was written for another cache layout). The
        cache takes the tensors as they are (with retrieval on it writes into them in place)."""
        names = set(self.layout) | {name[len("layout.") :] for name in state if name.startswith("layout.")}
        saved = {name: state.get(f"layout.{name}") for name in names}
        saved = {name: None if value is None or int(value) == -1 else int(value) for name, value in saved.items()}
        ours = {name: self.layout.get(name) for name in names}
        if saved != ours:
            different = sorted(name for name in names if saved[name] != ours[name])
            raise ValueError(
                f"This cache state was saved for another cache layout (differs in {different}: saved "
                f"{ {name: saved[name] for name in different} }, this cache { {name: ours[name] for name in different} })."
            )
        self.columns = int(state["columns"])
        self.seen, self.closed = state.get("seen"), state.get("closed")
        for index, layer in enumerate(self.layers):
            prefix = f"layers.{index}."
            layer.load_tensors({name[len(prefix) :]: tensor for name, tensor in state.items() if name.startswith(prefix)})

    def nbytes(self) -> int:
        """Bytes held by the cache tensors (what the benchmarks report)."""
        tensors = [tensor for layer in self.layers for tensor in layer.tensors().values()]
        tensors += [tensor for tensor in (self.seen, self.closed) if tensor is not None]
        return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


__all__ = ["HierarchicalXLCache"]
