"""hier-transformers: hierarchical-attention transformers for very long sequences.

Importing the package registers every class with the `transformers` Auto classes (in-process) and for
export (`register_for_auto_class`), so `save_pretrained` writes `auto_map` and copies the code files.
"""

from .modeling_blocks import AttentionPooling, FeedForward, MultiHeadAttention, RotaryEmbedding

# --- encoder family (hierarchical) ---

# --- decoder family (hierarchical_xl) ---

# --- documents and data ---

__version__ = "0.1.0"
