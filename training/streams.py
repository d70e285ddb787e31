"""Transformer-XL stream batching: each batch row follows one long stream of documents across optimizer steps.

Documents (``[BOS] + bytes + [EOS]``, padded at their end to whole segments) are assigned to the batch rows of every
process (balanced by length, in a seeded order), and row ``b`` of step ``i`` on process ``r`` holds tokens
``[i * block_size, (i + 1) * block_size)`` of stream ``r * rows + b``. The memory of a row is carried (detached) from
one segment to the next and from one step to the next; a segment that starts a document resets that row's memory.

The items are laid out so that a plain (unshuffled) ``DataLoader(batch_size=rows)``, sharded by accelerate over
``num_processes`` (batch ``j`` goes to process ``j % num_processes``), gives every process its own streams in order.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from hier_transformers import HierarchicalXLConfig
from hier_transformers.recurrence import copy_sources

IGNORE_INDEX = -100


def assign_documents(lengths: Sequence[int], num_streams: int, seed: int) -> list[list[int]]:
    """Document indices per stream: longest first onto the shortest stream (balanced totals), each stream's documents
    then shuffled with `seed`, so streams end at about the same length and no document is split between streams."""
    totals = [0] * num_streams
    streams: list[list[int]] = [[] for _ in range(num_streams)]
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        target = min(range(num_streams), key=lambda s: (totals[s], s))
        streams[target].append(index)
        totals[target] += lengths[index]
    rng = random.Random(seed)
    for stream in streams:
        rng.shuffle(stream)
    return streams


def split_long_documents(documents: Sequence[Sequence[int]], num_streams: int,
                         segment_length: int) -> list[Sequence[int]]:
    """Cut every document longer than an even share of the corpus (``total / num_streams``, in whole segments) into
    consecutive pieces of that length, so that one book, or a few long ones, still fill every stream: each piece reads
    on in another row whose memory starts there (as Transformer-XL cuts its one corpus stream into batch rows)."""
    total = sum(-(-len(doc) // segment_length) * segment_length for doc in documents)
    share = max(segment_length, -(-total // num_streams // segment_length) * segment_length)
    return [doc[start:start + share] for doc in documents for start in range(0, len(doc), share)]


class StreamDataset(Dataset):
    """Items ``{"input_ids", "labels", "attention_mask": [block_size], "resets": [block_size // segment_length]}``.

    Item ``(step * num_processes + process) * rows + row`` is step ``step`` of stream ``process * rows + row``.
    ``labels`` are the next token inside the same document (-100 after a document's last token and on padding);
    ``resets[k]`` is True when segment ``k`` of the block starts a new document for that row. With ``copy_match`` (and
    the model's ``config``, retrieval on) items also hold ``retrieval_labels`` [block_size]: each token's
    ``copy_sources`` target in its document, read from the stream's earlier steps too (a function of the stream
    alone, so a resumed run gets the same ones).
    """

    def __init__(self, documents: Sequence[Sequence[int]], rows: int, num_processes: int, block_size: int,
                 segment_length: int, pad_token_id: int, seed: int, copy_match: int = 0,
                 config: HierarchicalXLConfig | None = None):
        if block_size % segment_length:
            raise ValueError(f"block_size ({block_size}) must be a multiple of segment_length ({segment_length}) "
                             "for stream training")
        if copy_match and config is None:
            raise ValueError("copy_match > 0 (retrieval_labels) needs the model's `config`: its selection rule decides "
                             "which earlier tokens a query may be sent to")
        self.rows, self.num_processes, self.block_size = rows, num_processes, block_size
        self.copy_match, self.config = copy_match, config
        self.segment_length = segment_length
        num_streams = rows * num_processes
        documents = split_long_documents(documents, num_streams, segment_length)
        padded = [-(-len(doc) // segment_length) * segment_length for doc in documents]
        streams = assign_documents(padded, num_streams, seed)
        self.steps = min(sum(padded[i] for i in stream) for stream in streams) // block_size
        if self.steps < 1:
            raise ValueError(
                f"the training documents ({sum(len(d) for d in documents):,} tokens) do not fill one block of "
                f"block_size={block_size} in each of the {num_streams} streams (per_device_batch_size={rows} x "
                f"{num_processes} processes): use more data, a smaller batch or a smaller block_size")
        length = self.steps * block_size
        self.input_ids = torch.full((num_streams, length), pad_token_id, dtype=torch.long)
        self.labels = torch.full((num_streams, length), IGNORE_INDEX, dtype=torch.long)
        self.real = torch.zeros(num_streams, length, dtype=torch.bool)
        self.starts = torch.zeros(num_streams, length // segment_length, dtype=torch.bool)
        for stream, indices in enumerate(streams):
            position = 0
            for index in indices:
                if position >= length:
                    break
                doc = torch.as_tensor(documents[index], dtype=torch.long)[: length - position]
                end = position + doc.numel()
                self.input_ids[stream, position:end] = doc
                self.labels[stream, position:end - 1] = doc[1:]
                self.real[stream, position:end] = True
                self.starts[stream, position // segment_length] = True
                position += padded[index]
        if copy_match:  # the column of each document's first token, per stream, sorted (for `retrieval_labels`)
            self.document_starts = [(torch.nonzero(row).flatten() * segment_length).tolist() for row in self.starts]

    def __len__(self) -> int:
        return self.steps * self.num_processes * self.rows

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        step, stream = divmod(item, self.num_processes * self.rows)
        columns = slice(step * self.block_size, (step + 1) * self.block_size)
        segments = slice(step * self.block_size // self.segment_length,
                         (step + 1) * self.block_size // self.segment_length)
        item = {"input_ids": self.input_ids[stream, columns], "labels": self.labels[stream, columns],
                "attention_mask": self.real[stream, columns].long(), "resets": self.starts[stream, segments]}
        if self.copy_match:
            item["retrieval_labels"] = self.retrieval_labels(stream, columns.start)
        return item

    def retrieval_labels(self, stream: int, begin: int) -> torch.Tensor:
        """``copy_sources`` targets [block_size] of the block starting at column ``begin``, each document's tokens
        read back to ``retrieval_window`` positions before the block (as far as the memory can select)."""
        labels = torch.full((self.block_size,), IGNORE_INDEX, dtype=torch.long)
        stop = begin + self.block_size
        starts = self.document_starts[stream]
        overlapping = starts[max(bisect.bisect_right(starts, begin) - 1, 0): bisect.bisect_left(starts, stop)]
        for start, end in zip(overlapping, overlapping[1:] + [stop]):
            first = max(begin, start)
            real = int(self.real[stream, first:end].sum())  # the document's tokens in the block (padding after them)
            if real == 0:
                continue
            low = max(start, begin - self.config.retrieval_window - self.copy_match)
            tokens = self.input_ids[stream, low:first + real]
            labels[first - begin:first - begin + real] = copy_sources(
                tokens, self.config, self.copy_match, offset=low - start, first=first - low)
        return labels
