"""hier-transformers: hierarchical-attention transformers for very long sequences.

Importing the package registers every class with the `transformers` Auto classes (in-process) and for
export (`register_for_auto_class`), so `save_pretrained` writes `auto_map` and copies the code files.
"""

from .modeling_blocks import AttentionPooling, FeedForward, MultiHeadAttention, RotaryEmbedding

# --- encoder family (hierarchical) ---
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from .configuration_hierarchical import HierarchicalConfig
from .modeling_hierarchical import (
    HierarchicalForMaskedLM,
    HierarchicalForSequenceClassification,
    HierarchicalForTokenClassification,
    HierarchicalHeadOutput,
    HierarchicalModel,
    HierarchicalModelOutput,
    HierarchicalPreTrainedModel,
)
from .warm_start import hierarchical_from_pretrained_bert, minilm_path

AutoConfig.register(HierarchicalConfig.model_type, HierarchicalConfig, exist_ok=True)
HierarchicalConfig.register_for_auto_class("AutoConfig")
for _auto_class, _model_class in (
    (AutoModel, HierarchicalModel),
    (AutoModelForSequenceClassification, HierarchicalForSequenceClassification),
    (AutoModelForMaskedLM, HierarchicalForMaskedLM),
    (AutoModelForTokenClassification, HierarchicalForTokenClassification),
):
    _auto_class.register(HierarchicalConfig, _model_class, exist_ok=True)
    _model_class.register_for_auto_class(_auto_class.__name__)

# --- decoder family (hierarchical_xl) ---
from transformers import AutoModelForCausalLM, AutoTokenizer

from .cache_hierarchical_xl import HierarchicalXLCache
from .configuration_hierarchical_xl import HierarchicalXLConfig
from .modeling_hierarchical_xl import HierarchicalXLForCausalLM, HierarchicalXLModel, HierarchicalXLPreTrainedModel
from .recurrence import iter_segments, segment_lm_step
from .tokenization_byte import ByteTokenizer

AutoConfig.register(HierarchicalXLConfig.model_type, HierarchicalXLConfig, exist_ok=True)
HierarchicalXLConfig.register_for_auto_class("AutoConfig")
for _auto_class, _model_class in ((AutoModel, HierarchicalXLModel), (AutoModelForCausalLM, HierarchicalXLForCausalLM)):
    _auto_class.register(HierarchicalXLConfig, _model_class, exist_ok=True)
    _model_class.register_for_auto_class(_auto_class.__name__)
AutoTokenizer.register(HierarchicalXLConfig, tokenizer_class=ByteTokenizer, exist_ok=True)
ByteTokenizer.register_for_auto_class("AutoTokenizer")

# --- documents and data ---
from .data import load_20newsgroups, load_news_articles, load_text_files
from .preprocessing import DataCollatorForHierarchical, DocumentPreprocessor

__version__ = "0.1.0"
