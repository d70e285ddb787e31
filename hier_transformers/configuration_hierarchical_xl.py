"""Configuration of the HierarchicalXL decoder (Transformer-XL-style causal LM with hierarchical memory)."""

from __future__ import annotations

from transformers.configuration_utils import PreTrainedConfig

from .configuration_checks import (
    check_activation,
    check_positive_ints,
    check_positive_numbers,
    check_token_ids,
    is_int,
    is_number,
    reject_unknown_keys,
)

RETRIEVAL_SOFTMAX = ("grouped", "joint", "gated")


class HierarchicalXLConfig(PreTrainedConfig):
    r"""
    Configuration of [`HierarchicalXLModel`] / [`HierarchicalXLForCausalLM`].

    A token at position `t` attends, in every layer, to

    1. the tokens at positions `s` with `t - local_window < s <= t` (full resolution: its own patch causally and a
       window reaching back into earlier patches and earlier segments);
    2. the summaries of completed patches (patch `j` covers positions `[j * patch_size, (j + 1) * patch_size)` and is
       visible to `t` iff `(j + 1) * patch_size <= t`): the `max_patch_summaries` most recent ones, plus the not yet
       folded ones when sections are on (at most `max_patch_summaries + section_size - 1` patches);
    3. if `section_size` is set: summaries of sections (the mean of `section_size` consecutive patch summaries),
       formed once all their patches are older than the `max_patch_summaries` most recent ones; the
       `max_section_summaries` most recent sections are visible. Anything older is dropped.
    4. if `retrieval_top_k > 0` (coarse-to-fine retrieval, the selection branch of Native Sparse Attention): the
       tokens, at full resolution, of the `retrieval_top_k` patches with the highest summary score among the
       *selectable* ones: patch `j` is selectable for `t` iff `t - retrieval_window < j * patch_size <= t -
       local_window` (it starts outside the window, so it is complete, and all its tokens are still within the
       retrieval window). The score is content only (Native Sparse Attention's importance): per head the softmax
       over the selectable patches of `q_t . k_j * scaling` before RoPE, minus 1e-4 per patch of age (equal
       content: the newer wins), summed over the heads of the layer (one set of patches per
       query, shared by its heads). The chosen patches' tokens outside the window join the same softmax as the
       window and the summaries, each placed (re-rotated) in the `patch_size` positions right before the window,
       and each patch weighs as one key whose logit is its content logit (Landmark Attention's grouped softmax:
       token logit - logsumexp of its patch's token logits + the patch's content logit): position-free, so a model
       reads a longer `retrieval_window` than it trained with. In training mode the unchosen selectable patches
       also join, each as one key of its content logit with its summary as value (NSA's compressed branch), so the
       score of every candidate learns, not only of those chosen; eval reads only the top `retrieval_top_k`
       (`retrieval_softmax` below: "joint" reads each retrieved token by its own logit, "gated" gives retrieval a
       softmax and a gate of its own, with the compressed branch in eval too).

    Visibility is a pure function of positions, so a one-call forward, segment-by-segment processing with a
    [`HierarchicalXLCache`] and token-by-token generation compute the same thing. The cache is bounded by
    `local_window - 1` tokens, `max_patch_summaries (+ section_size - 1)` patch summaries and
    `max_section_summaries` section summaries per layer; with retrieval on, by `retrieval_window - 1` tokens and
    `max(patch_memory, ceil(retrieval_window / patch_size))` patch summaries instead (fixed by the config, not by the
    length of the stream).

    Args:
        vocab_size: size of the token vocabulary (260 for [`ByteTokenizer`]).
        hidden_size, num_hidden_layers, num_attention_heads, intermediate_size: transformer dimensions.
        hidden_act: feed-forward activation, a key of `transformers.activations.ACT2FN`.
        patch_size: tokens per patch (>= 1).
        local_window: number of most recent positions (the token itself included) seen at full resolution;
            at least `patch_size`, so a token always sees its own patch.
        max_patch_summaries: number of most recent completed patches visible as summaries (>= 1).
        section_size: patches per section, or `None` for no sections (>= 2 when set).
        max_section_summaries: number of most recent section summaries visible (>= 1; ignored without sections).
        retrieval_top_k: far patches each query reads at full resolution (0 = off: the model without retrieval).
        retrieval_window: number of most recent positions whose tokens stay retrievable (the cache keeps their
            keys/values); at least `local_window`. Only used when `retrieval_top_k > 0`.
        retrieval_softmax: how the chosen patches' tokens join the one softmax of the window and the summaries.
            "grouped" (Landmark Attention): each chosen patch weighs as one key whose logit is its gate (the query's
            content logit of the patch summary) and shares that weight among its tokens by their own softmax.
            "joint": every retrieved token is one more key of its own logit, as a window token (the selection
            branch of Native Sparse Attention, in the same softmax): a query can put its weight on one token of a
            patch, whatever the patch's summary says.
            "gated" (Native Sparse Attention's gated branches): the retrieved tokens, each by its own logit, and the
            unchosen selectable patches, each one key of its content logit with its summary as value (the compressed
            branch, in training and eval alike), form a softmax of their own; its output joins the window's per head
            through a gate computed from the token (a linear map initialised at 0, so the model starts as the one
            without retrieval and a checkpoint trained without it loads with retrieval switched on).
        retrieval_shared_choice: every layer after the first also reads the first layer's `retrieval_top_k` patches
            (with its own keys, values and gates; a patch both chose is read once), beside its own choice: the first
            layer's queries match tokens (a digit finds the patches holding it), deeper ones context (the question
            finds the key sentence); TidalDecode reuses a few layers' selection in the same way. False: every layer
            reads only its own choice.
        retrieval_choice_query: every layer after the first chooses its patches with a query of its own: the content
            query, held fixed, plus a learned linear map of the token (initialised at 0, so the model starts as the
            one without it and a checkpoint trained without it loads). Only the selection loss (`retrieval_labels`)
            trains it, and the summary keys it scores are held fixed too, so the loss cannot move the choosing
            layer's query and key projections (it reaches the layers below through the token state the map reads);
            the gates and the compressed branch keep the content logits. False: the choice is the content logits'.
        retrieval_recency: selection logit each candidate loses per patch of age, per head, before the softmax over
            candidates (>= 0). It breaks ties: two patches of equal content (repeated text) then differ by more than
            float noise and the newer wins, so the choice does not depend on how a text was cut into calls. It is
            also a recency prior that grows with distance (1e-4 takes 0.8 logits off a patch 8,192 patches back); keep
            it well above float noise (~1e-6) for the call-split equivalence. An eval-time knob: no weight depends
            on it.
        key_shift: each key also carries the previous token's key, through a learned per-channel weight
            (initialised at 0): `k_t + w * k_(t-1)`, before RoPE (a width-2 depthwise convolution of the keys, as in
            Primer; Olsson et al.'s "smeared key"). One layer can then match "the token after X", which exact copying
            (a pass key, a name) needs. False: the model without it, exactly.
        rope_theta: RoPE base (positions are global token positions, unbounded).
        rms_norm_eps: epsilon of the RMSNorms (pre-norm blocks).
        attention_dropout: dropout on attention weights (training only).
        attention_bias: bias in the q/k/v/o projections.
        initializer_range: std of the normal initialisation.
        tie_word_embeddings: share the input embedding and the LM head weights.
        pad_token_id, bos_token_id, eos_token_id: special ids, None or in `[0, vocab_size)` (eos: also a list).

    Unknown keyword arguments (`local_windw=32`) raise a `ValueError` listing the valid fields.
    """

    model_type = "hierarchical_xl"

    vocab_size: int = 260
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 1024
    hidden_act: str = "gelu"
    patch_size: int = 16
    local_window: int = 128
    max_patch_summaries: int = 32
    section_size: int | None = 8
    max_section_summaries: int = 32
    retrieval_top_k: int = 0
    retrieval_window: int = 16384
    retrieval_softmax: str = "grouped"
    retrieval_shared_choice: bool = False
    retrieval_choice_query: bool = False
    retrieval_recency: float = 1e-4
    key_shift: bool = False
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    attention_bias: bool = False
    initializer_range: float = 0.02
    use_cache: bool = True
    tie_word_embeddings: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2

    def __post_init__(self, **kwargs):
        reject_unknown_keys(self, kwargs)
        super().__post_init__(**kwargs)
        self.validate()

    def validate(self) -> None:
        """Check every knob; raise `ValueError` naming the field and the allowed range. Also run by
        `save_pretrained` before anything is written."""
        super().validate()
        check_positive_ints(
            self,
            (
                "vocab_size",
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "intermediate_size",
                "patch_size",
                "local_window",
                "max_patch_summaries",
            ),
        )
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be divisible by `num_attention_heads` "
                f"({self.num_attention_heads})."
            )
        if (self.hidden_size // self.num_attention_heads) % 2 != 0:
            raise ValueError("`hidden_size // num_attention_heads` (the head dim) must be even for RoPE.")
        if self.local_window < self.patch_size:
            raise ValueError(
                f"`local_window` ({self.local_window}) must be >= `patch_size` ({self.patch_size}) so that a token "
                "always sees its own patch at full resolution."
            )
        if self.section_size is not None:
            if not is_int(self.section_size) or self.section_size < 2:
                raise ValueError(f"`section_size` must be None or an integer >= 2, got {self.section_size!r}.")
            if not is_int(self.max_section_summaries) or self.max_section_summaries < 1:
                raise ValueError(
                    f"`max_section_summaries` must be an integer >= 1 when `section_size` is set, got "
                    f"{self.max_section_summaries!r}."
                )
        if not is_int(self.retrieval_top_k) or self.retrieval_top_k < 0:
            raise ValueError(
                f"`retrieval_top_k` must be an integer >= 0 (0 = retrieval off), got {self.retrieval_top_k!r}."
            )
        if not is_int(self.retrieval_window) or (self.retrieval_top_k > 0 and self.retrieval_window < self.local_window):
            raise ValueError(
                f"`retrieval_window` must be an integer >= `local_window` ({self.local_window}) when retrieval is on "
                f"(`retrieval_top_k` > 0): the window's own tokens are never retrieved, got {self.retrieval_window!r}."
            )
        if self.retrieval_softmax not in RETRIEVAL_SOFTMAX:
            raise ValueError(f"`retrieval_softmax` must be one of {RETRIEVAL_SOFTMAX}, got {self.retrieval_softmax!r}.")
        if not is_number(self.retrieval_recency) or self.retrieval_recency < 0:
            raise ValueError(
                f"`retrieval_recency` must be a number >= 0 (the selection logit lost per patch of age), got "
                f"{self.retrieval_recency!r}."
            )
        check_positive_numbers(self, ("rope_theta", "rms_norm_eps", "initializer_range"))
        if not is_number(self.attention_dropout) or not 0.0 <= self.attention_dropout < 1.0:
            raise ValueError(f"`attention_dropout` must be in [0, 1), got {self.attention_dropout!r}.")
        check_activation(self)
        check_token_ids(self, ("pad_token_id", "bos_token_id", "eos_token_id"))
        for name in ("attention_bias", "key_shift", "retrieval_shared_choice", "retrieval_choice_query",
                     "tie_word_embeddings", "use_cache"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be a bool, got {getattr(self, name)!r}.")
        if self.retrieval_choice_query and self.retrieval_top_k == 0:
            raise ValueError("`retrieval_choice_query=True` needs retrieval on: set `retrieval_top_k` > 0, or "
                             "`retrieval_choice_query=False`.")

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs) -> None:
        self.validate()  # before anything is written: a folder that cannot be loaded back is never made
        super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)

    @property
    def section_memory(self) -> int:
        """Section summaries a cache keeps per layer (0 without sections)."""
        return self.max_section_summaries if self.section_size is not None else 0

    @property
    def patch_memory(self) -> int:
        """Patch summaries a cache keeps per layer: the visible ones plus those waiting to be folded."""
        return self.max_patch_summaries + (self.section_size - 1 if self.section_size is not None else 0)

    @property
    def token_memory(self) -> int:
        """Tokens a cache keeps per layer: the window's, or the retrieval window's when retrieval is on."""
        return (self.retrieval_window if self.retrieval_top_k > 0 else self.local_window) - 1

    @property
    def summary_memory(self) -> int:
        """Patch summaries a cache keeps per layer: `patch_memory`, or with retrieval on also every patch that can
        still be selected (`ceil(retrieval_window / patch_size)`)."""
        if self.retrieval_top_k == 0:
            return self.patch_memory
        return max(self.patch_memory, -(-self.retrieval_window // self.patch_size))


__all__ = ["HierarchicalXLConfig"]
