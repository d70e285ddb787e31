"""Masked-language-model pretraining of the hierarchical encoder (HierarchicalForMaskedLM) with Accelerate.

Documents are laid out by `DocumentPreprocessor` (patches aligned with sentences, sections with paragraphs), batched
by `DataCollatorForHierarchical`, and masked BERT-style on top (15% of the real tokens: 80% [MASK], 10% random,
10% unchanged; padding and special tokens are never selected).

    python training/pretrain_mlm.py --config training/configs/mlm_news_small.yaml
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \\
        training/pretrain_mlm.py --config training/configs/mlm_news_small.yaml --output_dir runs/mlm_ddp
    python training/pretrain_mlm.py --config training/configs/mlm_news_small.yaml --resume   # continue a run
    python training/pretrain_mlm.py --config training/configs/mlm_long_minilm.yaml           # the long-document checkpoint

`init: minilm` continues from the offline MiniLM (all its token layers; the patch and section levels and the MLM
head's transform are new), `masking: whole_word` masks whole WordPiece words, and `baseline: minilm-windows` trains
MiniLM itself (`BertForMaskedLM`) on the same documents cut into independent 512-token windows: the peer the held-out
whole-document accuracy of the final evaluation (training/eval_mlm.py) is compared with.

Any run-config field can be overridden (``--max_steps 50``, ``--model.hidden_size 128``); see training/common.py.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
from transformers import BertForMaskedLM
from transformers.modeling_outputs import MaskedLMOutput

if __package__ in (None, ""):  # run as a script: make `training` and `hier_transformers` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.common import RunConfig, parse_run_args, train  # noqa: E402

LAYOUTS = ("sentence", "fixed")
MASKINGS = ("token", "whole_word")
BASELINES = ("minilm-windows",)
INITS = ("scratch", "minilm")  # or a folder holding a saved HierarchicalForMaskedLM


@dataclasses.dataclass
class MLMRunConfig(RunConfig):
    tokenizer: str = "minilm"
    model_name: str = "hier-mlm"
    mlm_probability: float = 0.15
    layout: str = "sentence"  # DocumentPreprocessor layout
    max_length: int | None = 1024  # tokens per document after layout (a multiple of model.patch_size), or None
    truncation: bool = True  # keep the first max_length tokens (whole patches) of longer documents; False: error
    masking: str = "token"  # "token" (BERT) or "whole_word" (every WordPiece of a chosen word)
    init: str = "scratch"  # "scratch", "minilm" (warm start of the token level) or a saved HierarchicalForMaskedLM
    # "minilm-windows" (with init: minilm): MiniLM itself, BertForMaskedLM over independent `window`-token windows
    baseline: str | None = None
    window: int = 512  # tokens per window of the baseline, [CLS] and [SEP] included
    final_eval: bool = True  # held-out whole-document masked-token accuracy at the end (training/eval_mlm.py)

    def validate(self) -> None:
        super().validate()
        if not 0 < self.mlm_probability < 1:
            raise ValueError(f"mlm_probability must be in (0, 1), got {self.mlm_probability!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.masking not in MASKINGS:
            raise ValueError(f"masking must be one of {MASKINGS}, got {self.masking!r}")
        if self.init not in INITS and not Path(self.init, "config.json").is_file():
            raise ValueError(f"init must be one of {INITS} or a folder with a saved HierarchicalForMaskedLM "
                             f"(config.json), got {self.init!r}")
        if self.baseline is not None and self.baseline not in BASELINES:
            raise ValueError(f"baseline must be None or one of {BASELINES}, got {self.baseline!r}")
        if self.baseline is not None and (self.tokenizer != "minilm" or self.init != "minilm"):
            raise ValueError(f"baseline={self.baseline!r} is MiniLM with its own tokenizer: set tokenizer='minilm' "
                             f"and init='minilm' (got {self.tokenizer!r}, {self.init!r})")
        if self.baseline is not None and set(self.model) - set(BASELINE_MODEL_FIELDS):
            raise ValueError(f"baseline={self.baseline!r} takes only the model fields {sorted(BASELINE_MODEL_FIELDS)}, "
                             f"got {sorted(set(self.model) - set(BASELINE_MODEL_FIELDS))}")
        if not 3 <= self.window <= 512:
            raise ValueError(f"window must be in [3, 512] (MiniLM's positions, [CLS] and [SEP] included), got {self.window!r}")
        if self.init == "minilm" and self.tokenizer != "minilm":
            raise ValueError(f"init='minilm' needs MiniLM's tokenizer: set tokenizer='minilm', got {self.tokenizer!r}")


# the baseline's dropout, named as in the hierarchical config -> BERT's names
BASELINE_MODEL_FIELDS = {"hidden_dropout_prob": "hidden_dropout_prob", "attention_dropout": "attention_probs_dropout_prob"}


def word_starts(tokenizer) -> torch.Tensor:
    """[vocab] bool: True where a token begins a word (WordPiece continuations are written ``##...``)."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return torch.tensor([not token.startswith("##") for token in tokens])


def mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, special_ids: list[int], mask_token_id: int,
                vocab_size: int, probability: float, generator: torch.Generator,
                starts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of a batch [B, N] -> (masked input_ids, labels with -100 where nothing is predicted).

    Only real tokens (attention_mask 1, not special) are selected; all draws come from ``generator``. With ``starts``
    (:func:`word_starts`) whole words are selected: a continuation token follows the draw of its word's first token.
    Each selected token is then replaced by [MASK] (80%), a random token (10%) or kept (10%).
    """
    shape = input_ids.shape
    draws = torch.rand((3, *shape), generator=generator).to(input_ids.device)  # select / mask / random
    candidates = attention_mask.bool() & ~torch.isin(input_ids, torch.tensor(special_ids, device=input_ids.device))
    select = draws[0]
    if starts is not None:
        begins = starts.to(input_ids.device)[input_ids] | ~candidates  # [B, N]: a word starts here
        positions = torch.arange(shape[-1], device=input_ids.device).expand(shape)
        first = torch.where(begins, positions, 0).cummax(dim=-1).values  # [B, N]: position of the word's first token
        select = select.gather(-1, first)
    selected = (select < probability) & candidates
    to_mask = selected & (draws[1] < 0.8)
    to_random = selected & ~to_mask & (draws[2] < 0.5)
    random_ids = torch.randint(vocab_size, shape, generator=generator).to(input_ids.device)
    masked = torch.where(to_mask, mask_token_id, input_ids)
    masked = torch.where(to_random, random_ids, masked)
    labels = torch.where(selected, input_ids, -100)
    return masked, labels


class MaskedLM:
    task = "masked-lm"
    pipeline_tag = "fill-mask"

    def __init__(self, config: MLMRunConfig):
        self.config = config

    def build_model(self, config: MLMRunConfig, tokenizer):
        from hier_transformers import (
            HierarchicalConfig, HierarchicalForMaskedLM, hierarchical_from_pretrained_bert, minilm_path,
        )

        if config.baseline == "minilm-windows":
            dropout = {BASELINE_MODEL_FIELDS[name]: value for name, value in config.model.items()}
            return WindowedMiniLMForMaskedLM.from_pretrained(minilm_path(), **dropout)
        if config.init == "minilm":
            return hierarchical_from_pretrained_bert(None, HierarchicalForMaskedLM, **config.model)[0].train()
        if config.init != "scratch":
            return HierarchicalForMaskedLM.from_pretrained(config.init, **config.model)
        model_config = HierarchicalConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **config.model)
        return HierarchicalForMaskedLM(model_config)

    def build_datasets(self, config: MLMRunConfig, tokenizer, corpus):
        if tokenizer.mask_token_id is None:
            raise ValueError(f"tokenizer={config.tokenizer!r} has no mask token; MLM needs one (e.g. tokenizer: minilm)")
        self.special_ids = list(tokenizer.all_special_ids)
        self.mask_token_id = tokenizer.mask_token_id
        self.vocab_size = len(tokenizer)
        self.starts = word_starts(tokenizer) if config.masking == "whole_word" else None
        corpus = corpus.filter(lambda text: bool(text.strip()), input_columns="text")
        layout, collate = document_layout(config, tokenizer)
        tokenized = corpus.map(layout, batched=True, input_columns="text", remove_columns=["text"],
                               desc="layout + tokenize")
        return tokenized["train"], tokenized["validation"], collate

    def final_evaluation(self, folder: Path) -> dict | None:
        """Held-out whole-document masked-token accuracy (training/eval_mlm.py), when `final_eval` is on."""
        if not self.config.final_eval:
            return None
        from training.eval_mlm import evaluate_folders

        return evaluate_folders(folder)

    def _masked(self, batch: dict, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        return mask_tokens(batch["input_ids"], batch["attention_mask"], self.special_ids, self.mask_token_id,
                           self.vocab_size, self.config.mlm_probability, generator, self.starts)

    def _loss(self, model, batch: dict, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the masked tokens; 0 (and no gradient) for a micro-batch with none (a short
        document can draw no mask). The vocabulary projection runs on the masked tokens only (it is half of a
        MiniLM-size model's compute otherwise)."""
        keep = labels != -100
        logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
        nll = torch.nn.functional.cross_entropy(logits.float(), labels[keep], reduction="sum")
        return nll / keep.sum().clamp(min=1)

    def train_step(self, model, batch: dict, seed: int, backward) -> tuple[float, int]:
        input_ids, labels = self._masked(batch, seed)
        loss = self._loss(model, batch, input_ids, labels)
        backward(loss)
        n_tokens = int((labels != -100).sum())
        return float(loss.detach()) * n_tokens, n_tokens

    def eval_step(self, model, batch: dict, seed: int):
        input_ids, labels = self._masked(batch, seed)
        n_tokens = (labels != -100).sum()
        nll = self._loss(model, batch, input_ids, labels).float() * n_tokens
        return nll, n_tokens, torch.zeros_like(n_tokens)


class WindowedMiniLMForMaskedLM(BertForMaskedLM):
    """`BertForMaskedLM` that, like `HierarchicalForMaskedLM`, projects only the `logits_to_keep` positions onto the
    vocabulary, so the windowed peer trains at the same cost per token. Its weights and config are BERT's, and it is
    saved under BERT's class name: the folder loads as a plain `BertForMaskedLM`."""

    def forward(self, input_ids=None, attention_mask=None, logits_to_keep=None, **kwargs):
        if logits_to_keep is None:
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hidden_states = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return MaskedLMOutput(logits=self.cls(hidden_states[logits_to_keep]))  # [num_kept, vocab_size]


WindowedMiniLMForMaskedLM.__name__ = WindowedMiniLMForMaskedLM.__qualname__ = "BertForMaskedLM"  # saved architecture


def window_pieces(items, window: int) -> list:
    """Consecutive pieces of ``items`` that fill a ``window`` with [CLS] and [SEP] added."""
    return [items[start:start + window - 2] for start in range(0, len(items), window - 2)]


def with_cls_and_sep(tokenizer, ids: list[int]) -> list[int]:
    return [tokenizer.cls_token_id, *ids, tokenizer.sep_token_id]


def document_layout(config: MLMRunConfig, tokenizer):
    """(tokenize function for `datasets.map`, collator): the hierarchical layout of whole documents, or the
    baseline's independent windows of the same first `max_length` tokens."""
    from hier_transformers import HierarchicalConfig
    from hier_transformers.preprocessing import DataCollatorForHierarchical, DocumentPreprocessor

    if config.baseline == "minilm-windows":
        from transformers import DataCollatorWithPadding

        def windows(texts: list[str]) -> dict[str, list]:
            rows = []
            for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
                ids = ids[: config.max_length] if config.truncation and config.max_length else ids
                rows += [with_cls_and_sep(tokenizer, piece) for piece in window_pieces(ids, config.window)]
            return {"input_ids": rows, "attention_mask": [[1] * len(row) for row in rows]}

        return windows, DataCollatorWithPadding(tokenizer)
    sizes = HierarchicalConfig(**config.model)  # the model's patch/section sizes (validated)
    preprocess = DocumentPreprocessor(tokenizer, sizes.patch_size, sizes.section_size, layout=config.layout,
                                      max_length=config.max_length, truncation=config.truncation)
    return preprocess, DataCollatorForHierarchical(tokenizer, sizes.patch_size, sizes.section_size)


def main(argv: list[str] | None = None) -> dict:
    config, resume = parse_run_args(MLMRunConfig, argv)
    return train(config, MaskedLM(config), resume=resume)


if __name__ == "__main__":
    main()
