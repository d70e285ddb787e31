"""Held-out evaluation of byte-level language models on long documents: bits per byte by position in the stream.

Every document is read from its first byte to its last, in segments, and each byte is predicted from what the model
may see at that point:

- HierarchicalXL with its memory carried from the document's start (``reset_every=None``), or with the memory reset
  every ``reset_every`` bytes (the ablation that shows what the memory beyond that distance is worth);
- a full-attention model (Llama, GPT-2) in consecutive windows of its context ``context`` (its memory is reset at
  every window: it cannot see further back);
- a sliding-window model (Mistral) with its bounded ``DynamicCache`` carried through the document.

Scores are kept per byte, so they can be bucketed by position (``[0, 512)``, ``[512, 2k)``, ...) and given 95%
bootstrap intervals over blocks of the held-out text. ``compressor_bits_per_byte`` gives the ``bzip2 -9`` and
``xz -9e`` anchors on exactly the same bytes.
"""

from __future__ import annotations

import bz2
import lzma
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

POSITION_BUCKETS = (0, 512, 2048, 8192, 32768, 131072)  # bucket edges in bytes from the document start
LN2 = math.log(2.0)


def bucket_names(edges: Sequence[int] = POSITION_BUCKETS) -> list[str]:
    def short(value: int) -> str:
        return f"{value // 1024}k" if value >= 1024 and value % 1024 == 0 else str(value)

    return [f"[{short(lo)},{short(hi)})" for lo, hi in zip(edges, edges[1:])] + [f"[{short(edges[-1])},inf)"]


@dataclass
class DocumentScores:
    """Per-byte negative log-likelihood (nats) of each document, in document order."""

    nll: list[np.ndarray]  # one [num_bytes] float64 array per document

    def bits_per_byte(self) -> float:
        return float(sum(doc.sum() for doc in self.nll) / LN2 / max(sum(doc.size for doc in self.nll), 1))

    def by_position(self, edges: Sequence[int] = POSITION_BUCKETS) -> dict[str, dict[str, float]]:
        """{bucket: {"bits_per_byte", "bytes"}} over byte positions counted from each document's start."""
        result = {}
        bounds = list(edges) + [None]
        for name, lo, hi in zip(bucket_names(edges), bounds, bounds[1:]):
            parts = [doc[lo:hi] for doc in self.nll if doc.size > lo]
            count = sum(part.size for part in parts)
            if count:
                result[name] = {"bits_per_byte": float(sum(part.sum() for part in parts) / LN2 / count), "bytes": count}
        return result

    def blocks(self, block_bytes: int = 4096) -> np.ndarray:
        """[num_blocks, 2] (nll sum, bytes) of consecutive blocks of each document: the bootstrap's units."""
        rows = []
        for doc in self.nll:
            for start in range(0, doc.size, block_bytes):
                piece = doc[start:start + block_bytes]
                rows.append((piece.sum(), piece.size))
        return np.asarray(rows, dtype=np.float64).reshape(-1, 2)


def bootstrap_interval(scores: DocumentScores, baseline: DocumentScores | None = None, block_bytes: int = 4096,
                       samples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% block-bootstrap interval of bits per byte, or of (scores - baseline) when both score the same bytes."""
    blocks = scores.blocks(block_bytes)
    other = baseline.blocks(block_bytes) if baseline is not None else None
    if other is not None and not np.array_equal(blocks[:, 1], other[:, 1]):
        raise ValueError("baseline must score exactly the same documents and bytes")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(blocks), size=(samples, len(blocks)))
    value = blocks[draws, 0].sum(1) / blocks[draws, 1].sum(1)
    if other is not None:
        value = value - other[draws, 0].sum(1) / other[draws, 1].sum(1)
    low, high = np.percentile(value / LN2, [2.5, 97.5])
    return float(low), float(high)


def compressor_bits_per_byte(texts: Sequence[str]) -> dict[str, float]:
    """``bzip2 -9`` and ``xz -9e`` on each document's UTF-8 bytes (compressed separately, as the models read them)."""
    data = [text.encode("utf-8") for text in texts]
    total = sum(len(item) for item in data)
    bzip2 = sum(len(bz2.compress(item, compresslevel=9)) for item in data)
    xz = sum(len(lzma.compress(item, preset=9 | lzma.PRESET_EXTREME)) for item in data)
    return {"bzip2_-9": 8.0 * bzip2 / total, "xz_-9e": 8.0 * xz / total}


def encode_documents(tokenizer, texts: Sequence[str]) -> list[torch.Tensor]:
    """Each text as [BOS] + its bytes (ByteTokenizer ids): the BOS predicts the first byte, so every byte is scored."""
    if type(tokenizer).__name__ != "ByteTokenizer":
        raise ValueError("bits per byte by position needs a byte-level tokenizer (ByteTokenizer): one token = one byte")
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    documents = [torch.tensor([tokenizer.bos_token_id, *row], dtype=torch.long) for row in ids]
    for text, row in zip(texts, documents):
        if row.numel() - 1 != len(text.encode("utf-8")):
            raise ValueError("the tokenizer did not give one token per UTF-8 byte")
    return documents


def _token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")  # [B, L]


@torch.no_grad()
def score_documents(model, documents: Sequence[torch.Tensor], kind: str, segment_length: int = 512,
                    reset_every: int | None = None, context: int | None = None, batch_size: int = 8,
                    progress: bool = True) -> DocumentScores:
    """Per-byte NLL of each document (ids from `encode_documents`) under `model`.

    kind: ``"hierarchical_xl"`` (segments with the memory carried, or reset every `reset_every` bytes),
    ``"full"`` (a full-attention model over consecutive windows of `context` tokens) or ``"sliding"`` (a model whose
    transformers cache is bounded by its sliding window, carried through each document in segments).
    """
    if kind not in ("hierarchical_xl", "full", "sliding"):
        raise ValueError(f"kind must be 'hierarchical_xl', 'full' or 'sliding', got {kind!r}")
    if kind == "full" and not context:
        raise ValueError("kind='full' needs `context`, the model's attention span in tokens")
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(documents)), key=lambda index: -documents[index].numel())
    results: dict[int, np.ndarray] = {}
    bar = tqdm(total=sum(doc.numel() - 1 for doc in documents), unit="B", unit_scale=True, disable=not progress,
               desc=f"score {kind}")
    for first in range(0, len(order), batch_size):
        rows = order[first:first + batch_size]
        length = max(documents[index].numel() for index in rows)
        ids = torch.zeros(len(rows), length, dtype=torch.long)
        real = torch.zeros(len(rows), length, dtype=torch.bool)
        for row, index in enumerate(rows):
            ids[row, :documents[index].numel()] = documents[index]
            real[row, :documents[index].numel()] = True
        ids, real = ids.to(device), real.to(device)
        nll = torch.zeros(len(rows), length - 1, dtype=torch.float64, device=device)
        span = context if kind == "full" else (reset_every or length)
        for window in range(0, length - 1, span):  # the model's memory starts empty at every window
            cache = None
            stop = min(window + span, length - 1)
            step = stop - window if kind == "full" else segment_length
            for start in range(window, stop, step):
                end = min(start + step, stop)
                mask = real[:, start:end]
                if not bool(mask.any()):
                    break
                if kind == "hierarchical_xl":
                    out = model(input_ids=ids[:, start:end], attention_mask=mask.long(), cache=cache, use_cache=True)
                    cache = out.cache
                elif kind == "sliding":
                    out = model(input_ids=ids[:, start:end], attention_mask=real[:, window:end].long(), cache=cache,
                                use_cache=True)
                    cache = out.cache
                else:
                    out = model(input_ids=ids[:, start:end], attention_mask=mask.long())
                nll[:, start:end] = _token_nll(out.logits, ids[:, start + 1:end + 1]).double()
                bar.update(int(real[:, start + 1:end + 1].sum()))
        for row, index in enumerate(rows):
            results[index] = nll[row, :documents[index].numel() - 1].cpu().numpy()
    bar.close()
    return DocumentScores([results[index] for index in range(len(documents))])
