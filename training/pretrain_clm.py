"""Causal-LM pretraining of HierarchicalXLForCausalLM with Accelerate, Transformer-XL style.

The corpus is tokenised (byte level by default), documents joined with EOS and cut into blocks of `block_size` tokens.
Each block is processed as consecutive segments of `segment_length` tokens with the segment memory (the model's
cache: local window + patch/section summaries) carried from one segment to the next and detached (truncated BPTT,
`hier_transformers.recurrence.segment_lm_step`). Evaluation reports bits per byte for byte-level tokenizers.

`model_type: gpt2` (or `llama`) trains a full-attention `transformers.GPT2LMHeadModel` (`LlamaForCausalLM`) baseline through the same loop (same data
order, optimizer, schedule, steps, batch and held-out blocks): it has no memory and reads each block of `block_size`
tokens in one call (`n_positions = segment_length = block_size`); `model` then holds only the size fields
(`hidden_size`, `num_hidden_layers`, `num_attention_heads`, `intermediate_size`, `hidden_act`), dropout is 0 as in
the XL model. Both are evaluated on the same validation blocks, each block's first token given, every later one
predicted from everything before it in the block.

    python training/pretrain_clm.py --config training/configs/xl_news_small.yaml
    python training/pretrain_clm.py --config training/configs/gpt2_news_small.yaml   # the same-size GPT-2 baseline
    python training/pretrain_clm.py --config training/configs/llama_news_small.yaml  # the same-size Llama baseline
    python training/generate.py runs/xl_news_small/final --prompt "The government said"
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \\
        training/pretrain_clm.py --config training/configs/xl_news_small.yaml --output_dir runs/xl_ddp
    python training/pretrain_clm.py --config training/configs/xl_news_small.yaml --resume   # continue a run

Any run-config field can be overridden (``--max_steps 50``, ``--model.hidden_size 128``); see training/common.py.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `training` and `hier_transformers` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hier_transformers.recurrence import segment_lm_step  # noqa: E402
from training.common import RunConfig, byte_level, parse_run_args, train  # noqa: E402

# Full-attention baselines from transformers, trained through the same loop: run-config `model` field -> their
# config field (no hierarchy fields apply to them). GPT-2 has learned absolute positions, Llama RoPE.
BASELINE_FIELDS = {
    "gpt2": {"hidden_size": "n_embd", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
             "intermediate_size": "n_inner", "hidden_act": "activation_function"},
    "llama": {name: name for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                                      "hidden_act")},
}
GPT2_FIELDS = BASELINE_FIELDS["gpt2"]
MODEL_TYPES = ("hierarchical_xl", *BASELINE_FIELDS)


@dataclasses.dataclass
class CLMRunConfig(RunConfig):
    tokenizer: str = "byte"
    model_name: str = "hier-xl"
    model_type: str = "hierarchical_xl"  # or "gpt2" / "llama": same-size full-attention baselines, a block per call
    block_size: int = 1024  # tokens per training row (the memory is reset between rows)
    segment_length: int = 256  # tokens per forward/backward; the memory is carried (detached) across segments

    def validate(self) -> None:
        super().validate()
        for name in ("block_size", "segment_length"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 2:
                raise ValueError(f"{name} must be an integer >= 2, got {getattr(self, name)!r}")
        if self.segment_length > self.block_size:
            raise ValueError(f"segment_length ({self.segment_length}) must be <= block_size ({self.block_size})")
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
        if self.model_type in BASELINE_FIELDS:
            if self.segment_length != self.block_size:
                raise ValueError(f"model_type={self.model_type!r} has no memory and reads a whole block per call: "
                                 f"segment_length ({self.segment_length}) must equal block_size ({self.block_size})")
            unknown = sorted(set(self.model) - set(BASELINE_FIELDS[self.model_type]))
            if unknown:
                raise ValueError(f"model fields {unknown} do not apply to model_type={self.model_type!r}; its fields "
                                 f"are {sorted(BASELINE_FIELDS[self.model_type])}")


def group_into_blocks(batch: dict[str, list[list[int]]], block_size: int) -> dict[str, list[list[int]]]:
    """Concatenate token lists and cut them into rows of exactly block_size (the remainder of a map batch is dropped)."""
    stream = [token for ids in batch["input_ids"] for token in ids]
    usable = len(stream) - len(stream) % block_size
    return {"input_ids": [stream[start:start + block_size] for start in range(0, usable, block_size)]}


def empty_memory(model):
    """A fresh segment memory for a (possibly DDP-wrapped) HierarchicalXL model."""
    from hier_transformers import HierarchicalXLCache

    return HierarchicalXLCache(getattr(model, "module", model).config)


class CausalLM:
    task = "causal-lm"
    pipeline_tag = "text-generation"

    def __init__(self, config: CLMRunConfig):
        self.config = config

    def build_model(self, config: CLMRunConfig, tokenizer):
        from hier_transformers import HierarchicalXLConfig, HierarchicalXLForCausalLM

        special = {name: getattr(tokenizer, name) for name in ("pad_token_id", "bos_token_id", "eos_token_id")}
        if config.model_type in BASELINE_FIELDS:
            from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

            defaults = HierarchicalXLConfig()  # unset size fields default as the XL model's do
            fields = BASELINE_FIELDS[config.model_type]
            sizes = {fields[name]: config.model.get(name, getattr(defaults, name)) for name in fields}
            if config.model_type == "gpt2":
                model_config = GPT2Config(vocab_size=len(tokenizer), n_positions=config.block_size, resid_pdrop=0.0,
                                          embd_pdrop=0.0, attn_pdrop=0.0, **sizes, **special)
                model_class = GPT2LMHeadModel
            else:
                model_config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=config.block_size,
                                           num_key_value_heads=sizes["num_attention_heads"],
                                           tie_word_embeddings=defaults.tie_word_embeddings, **sizes, **special)
                model_class = LlamaForCausalLM
            model_config._attn_implementation = "sdpa"
            return model_class(model_config)
        model_config = HierarchicalXLConfig(vocab_size=len(tokenizer), **special, **config.model)
        return HierarchicalXLForCausalLM(model_config)

    def build_datasets(self, config: CLMRunConfig, tokenizer, corpus):
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError(f"tokenizer={config.tokenizer!r} has no EOS token to separate documents")
        self.count_bytes = byte_level(tokenizer)
        self.first_byte_id = len(tokenizer.all_special_ids) if self.count_bytes else 0

        def tokenize(texts: list[str]) -> dict[str, list[list[int]]]:
            return {"input_ids": [ids + [eos] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]}

        tokenized = corpus.map(tokenize, batched=True, input_columns="text", remove_columns=["text"], desc="tokenize")
        blocks = tokenized.map(group_into_blocks, batched=True, batch_size=1000,
                               fn_kwargs={"block_size": config.block_size}, desc=f"blocks of {config.block_size}")
        for split, part in blocks.items():
            if len(part) == 0:
                raise ValueError(f"the {split} split is shorter than one block of block_size={config.block_size} tokens")
        blocks = blocks.with_format("torch")
        return blocks["train"], blocks["validation"], None

    def block_loss(self, model, input_ids: torch.Tensor, backward=None) -> tuple[torch.Tensor, int]:
        """(summed next-token loss over a [batch, block_size] block, number of predictions); `backward` gets the
        mean. XL: segment by segment with the detached memory carried; baselines: the whole block in one call."""
        if self.config.model_type in BASELINE_FIELDS:
            logits = model(input_ids=input_ids).logits[:, :-1]  # [B, block_size - 1, vocab]
            targets = input_ids[:, 1:]
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                     targets.reshape(-1), reduction="sum")
            if backward is not None:
                backward(loss / targets.numel())
            return loss.detach(), targets.numel()
        loss_sum, n_tokens, _ = segment_lm_step(model, input_ids, self.config.segment_length,
                                                cache=empty_memory(model), backward=backward)
        return loss_sum, n_tokens

    def train_step(self, model, batch: dict, seed: int, backward) -> tuple[float, int]:
        loss_sum, n_tokens = self.block_loss(model, batch["input_ids"], backward)
        return float(loss_sum), int(n_tokens)

    def eval_step(self, model, batch: dict, seed: int):
        input_ids = batch["input_ids"]
        loss_sum, n_tokens = self.block_loss(model, input_ids)
        targets = input_ids[:, 1:]
        num_bytes = (targets >= self.first_byte_id).sum() if self.count_bytes else torch.zeros((), dtype=torch.long)
        return torch.as_tensor(loss_sum, device=input_ids.device), torch.as_tensor(n_tokens, device=input_ids.device), num_bytes


def main(argv: list[str] | None = None) -> dict:
    config, resume = parse_run_args(CLMRunConfig, argv)
    return train(config, CausalLM(config), resume=resume)


if __name__ == "__main__":
    main()
