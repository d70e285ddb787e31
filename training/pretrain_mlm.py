"""Masked-language-model pretraining of the hierarchical encoder (HierarchicalForMaskedLM) with Accelerate.

Documents are laid out by `DocumentPreprocessor` (patches aligned with sentences, sections with paragraphs), batched
by `DataCollatorForHierarchical`, and masked BERT-style on top (15% of the real tokens: 80% [MASK], 10% random,
10% unchanged; padding and special tokens are never selected).

    python training/pretrain_mlm.py --config training/configs/mlm_news_small.yaml
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \\
        training/pretrain_mlm.py --config training/configs/mlm_news_small.yaml --output_dir runs/mlm_ddp
    python training/pretrain_mlm.py --config training/configs/mlm_news_small.yaml --resume   # continue a run

Any run-config field can be overridden (``--max_steps 50``, ``--model.hidden_size 128``); see training/common.py.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `training` and `hier_transformers` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.common import RunConfig, parse_run_args, train  # noqa: E402

LAYOUTS = ("sentence", "fixed")


@dataclasses.dataclass
class MLMRunConfig(RunConfig):
    tokenizer: str = "minilm"
    model_name: str = "hier-mlm"
    mlm_probability: float = 0.15
    layout: str = "sentence"  # DocumentPreprocessor layout
    max_length: int | None = 1024  # tokens per document after layout (a multiple of model.patch_size), or None
    truncation: bool = True  # keep the first max_length tokens (whole patches) of longer documents; False: error

    def validate(self) -> None:
        super().validate()
        if not 0 < self.mlm_probability < 1:
            raise ValueError(f"mlm_probability must be in (0, 1), got {self.mlm_probability!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")


def mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, special_ids: list[int], mask_token_id: int,
                vocab_size: int, probability: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of a batch [B, N] -> (masked input_ids, labels with -100 where nothing is predicted).

    Only real tokens (attention_mask 1, not special) are selected; all draws come from ``generator``.
    """
    shape = input_ids.shape
    draws = torch.rand((3, *shape), generator=generator).to(input_ids.device)  # select / mask / random
    candidates = attention_mask.bool() & ~torch.isin(input_ids, torch.tensor(special_ids, device=input_ids.device))
    selected = (draws[0] < probability) & candidates
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
        from hier_transformers import HierarchicalConfig, HierarchicalForMaskedLM

        model_config = HierarchicalConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **config.model)
        return HierarchicalForMaskedLM(model_config)

    def build_datasets(self, config: MLMRunConfig, tokenizer, corpus):
        from hier_transformers import HierarchicalConfig
        from hier_transformers.preprocessing import DataCollatorForHierarchical, DocumentPreprocessor

        if tokenizer.mask_token_id is None:
            raise ValueError(f"tokenizer={config.tokenizer!r} has no mask token; MLM needs one (e.g. tokenizer: minilm)")
        self.special_ids = list(tokenizer.all_special_ids)
        self.mask_token_id = tokenizer.mask_token_id
        self.vocab_size = len(tokenizer)
        sizes = HierarchicalConfig(**config.model)  # the model's patch/section sizes (validated)
        preprocess = DocumentPreprocessor(tokenizer, sizes.patch_size, sizes.section_size, layout=config.layout,
                                          max_length=config.max_length, truncation=config.truncation)
        corpus = corpus.filter(lambda text: bool(text.strip()), input_columns="text")
        tokenized = corpus.map(preprocess, batched=True, input_columns="text", remove_columns=["text"],
                               desc="layout + tokenize")
        collate = DataCollatorForHierarchical(tokenizer, sizes.patch_size, sizes.section_size)
        return tokenized["train"], tokenized["validation"], collate

    def _masked(self, batch: dict, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        return mask_tokens(batch["input_ids"], batch["attention_mask"], self.special_ids, self.mask_token_id,
                           self.vocab_size, self.config.mlm_probability, generator)

    def train_step(self, model, batch: dict, seed: int, backward) -> tuple[float, int]:
        input_ids, labels = self._masked(batch, seed)
        outputs = model(input_ids=input_ids, attention_mask=batch["attention_mask"], labels=labels)
        backward(outputs.loss)
        n_tokens = int((labels != -100).sum())
        return float(outputs.loss.detach()) * n_tokens, n_tokens

    def eval_step(self, model, batch: dict, seed: int):
        input_ids, labels = self._masked(batch, seed)
        logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"]).logits
        nll = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="sum")
        n_tokens = (labels != -100).sum()
        return nll, n_tokens, torch.zeros_like(n_tokens)


def main(argv: list[str] | None = None) -> dict:
    config, resume = parse_run_args(MLMRunConfig, argv)
    return train(config, MaskedLM(config), resume=resume)


if __name__ == "__main__":
    main()
