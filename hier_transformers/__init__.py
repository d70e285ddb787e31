"""hier-transformers: hierarchical-attention transformers for very long sequences.

Importing the package registers every class with the `transformers` Auto classes (in-process) and for
export (`register_for_auto_class`), so `save_pretrained` writes `auto_map` and copies the code files.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
)

from .cache_hierarchical_xl import HierarchicalXLCache
from .configuration_hierarchical import HierarchicalConfig
from .configuration_hierarchical_xl import HierarchicalXLConfig
from .modeling_blocks import AttentionPooling, FeedForward, MultiHeadAttention, RotaryEmbedding
from .modeling_hierarchical import (
    HierarchicalForMaskedLM,
    HierarchicalForSequenceClassification,
    HierarchicalForTokenClassification,
    HierarchicalHeadOutput,
    HierarchicalModel,
    HierarchicalModelOutput,
    HierarchicalPreTrainedModel,
)
from .modeling_hierarchical_xl import HierarchicalXLForCausalLM, HierarchicalXLModel, HierarchicalXLPreTrainedModel
from .preprocessing import DataCollatorForHierarchical, DocumentPreprocessor
from .explain import Explanation, explain, explanation_html, plot_attention
from .recurrence import copy_sources, iter_segments, segment_lm_step
from .tokenization_byte import ByteTokenizer
from .warm_start import hierarchical_from_pretrained_bert, minilm_path

__version__ = "0.1.0"

# The data loaders need `datasets` (and through it pandas/pyarrow, ~0.6 s): imported on first use, so that loading a
# model does not pay for it.
_DATA_LOADERS = ("load_20newsgroups", "load_news_articles", "load_text_files")


def __getattr__(name: str):
    if name in _DATA_LOADERS:
        from . import data

        return getattr(data, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

_AUTO_MODELS = (
    (HierarchicalConfig, AutoModel, HierarchicalModel),
    (HierarchicalConfig, AutoModelForSequenceClassification, HierarchicalForSequenceClassification),
    (HierarchicalConfig, AutoModelForMaskedLM, HierarchicalForMaskedLM),
    (HierarchicalConfig, AutoModelForTokenClassification, HierarchicalForTokenClassification),
    (HierarchicalXLConfig, AutoModel, HierarchicalXLModel),
    (HierarchicalXLConfig, AutoModelForCausalLM, HierarchicalXLForCausalLM),
)

for _config_class in (HierarchicalConfig, HierarchicalXLConfig):
    AutoConfig.register(_config_class.model_type, _config_class, exist_ok=True)
    _config_class.register_for_auto_class("AutoConfig")
for _config_class, _auto_class, _model_class in _AUTO_MODELS:
    _auto_class.register(_config_class, _model_class, exist_ok=True)
    _model_class.register_for_auto_class(_auto_class.__name__)
AutoTokenizer.register(HierarchicalXLConfig, tokenizer_class=ByteTokenizer, exist_ok=True)
ByteTokenizer.register_for_auto_class("AutoTokenizer")
