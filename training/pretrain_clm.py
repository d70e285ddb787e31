"""Causal-LM pretraining of HierarchicalXLForCausalLM with Accelerate, Transformer-XL style.

Documents are tokenised (byte level by default) as ``[BOS] + tokens + [EOS]``. With ``stream: true`` (the default for
HierarchicalXL) every batch row follows one long stream of documents (`training/streams.py`): each optimizer step
reads the next ``block_size`` tokens of every row as segments of ``segment_length``, and the segment memory (the
model's cache: local window + patch/section summaries) is carried, detached, from segment to segment and from step to
step (truncated BPTT); a row's memory is reset where its next document begins; `--resume` restores the streams and
their memories exactly. With ``stream: false`` (the default of the baselines) each row is an independent block whose
memory starts empty.

``model_type: llama`` / ``mistral`` / ``gpt2`` trains a same-size `transformers` baseline through the same loop (same
data, optimizer, schedule; blocks of ``block_size`` tokens read in one call, the context of a full-attention model):
Llama (RoPE, full attention), Mistral (RoPE, sliding window ``model.sliding_window``) and GPT-2 (learned absolute
positions). ``model`` then holds only the size fields (and Mistral's ``sliding_window``).

The periodic evaluation reports bits per byte on validation blocks. At the end, a byte-level run scores the whole
validation split document by document with the memory carried from each document's first byte (`training/lm_eval.py`),
next to ``bzip2 -9`` and ``xz -9e`` on the same bytes (``final_eval`` in `run_summary.json` and the model card).

    python training/pretrain_clm.py --config training/configs/xl_news_small.yaml
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
from training.common import RunConfig, byte_level, load_corpus, parse_run_args, train  # noqa: E402
from training.streams import StreamDataset  # noqa: E402

# Baselines from transformers, trained through the same loop: run-config `model` field -> their config field (no
# hierarchy fields apply to them). GPT-2 has learned absolute positions; Llama and Mistral RoPE.
SIZE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act")
BASELINE_FIELDS = {
    "gpt2": {"hidden_size": "n_embd", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
             "intermediate_size": "n_inner", "hidden_act": "activation_function"},
    "llama": {name: name for name in SIZE_FIELDS},
    "mistral": {name: name for name in (*SIZE_FIELDS, "sliding_window")},
}
MODEL_TYPES = ("hierarchical_xl", *BASELINE_FIELDS)
MEMORY_FILE = "stream_memory_rank{rank}.safetensors"
EVAL_SEGMENT_LENGTH = 1024  # tokens per forward when scoring whole documents


@dataclasses.dataclass
class CLMRunConfig(RunConfig):
    tokenizer: str = "byte"
    model_name: str = "hier-xl"
    model_type: str = "hierarchical_xl"  # or "llama" / "mistral" / "gpt2": same-size baselines, a block per call
    block_size: int = 1024  # tokens per batch row per optimizer step
    segment_length: int = 256  # tokens per forward/backward; the memory is carried (detached) across segments
    stream: bool | None = None  # rows follow document streams across steps, memory carried; None: True for XL only
    final_eval: bool = True  # score the whole validation split document by document at the end (byte level)
    # > 0 (stream training, retrieval on): also teach every layer after the first to choose, for each token, the patch
    # holding what followed the last occurrence of its `retrieval_match` preceding tokens (recurrence.copy_sources),
    # this weight times that selection cross-entropy added to the LM loss
    retrieval_loss_weight: float = 0.0
    retrieval_match: int = 12

    def validate(self) -> None:
        super().validate()
        if self.stream is None:
            self.stream = self.model_type == "hierarchical_xl"
        for name in ("block_size", "segment_length"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 2:
                raise ValueError(f"{name} must be an integer >= 2, got {getattr(self, name)!r}")
        if self.segment_length > self.block_size:
            raise ValueError(f"segment_length ({self.segment_length}) must be <= block_size ({self.block_size})")
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
        weight = self.retrieval_loss_weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise ValueError(f"retrieval_loss_weight must be a number >= 0 (0 = off), got {weight!r}")
        match = self.retrieval_match
        if isinstance(match, bool) or not isinstance(match, int) or match < 1:
            raise ValueError(f"retrieval_match must be an integer >= 1 (tokens of repeated context), got "
                             f"{self.retrieval_match!r}")
        if weight > 0 and not (self.stream and self.model.get("retrieval_top_k", 0) > 0):
            raise ValueError("retrieval_loss_weight > 0 supervises the choice of far patches: it needs stream: true "
                             "and model.retrieval_top_k > 0 (a hierarchical_xl model with retrieval on)")
        if self.stream and self.block_size % self.segment_length:
            raise ValueError(f"stream: true needs block_size ({self.block_size}) to be a multiple of segment_length "
                             f"({self.segment_length})")
        if self.model_type in BASELINE_FIELDS:
            if self.stream:
                raise ValueError(f"model_type={self.model_type!r} has no segment memory to carry: set stream: false")
            if self.segment_length != self.block_size:
                raise ValueError(f"model_type={self.model_type!r} reads a whole block per call: segment_length "
                                 f"({self.segment_length}) must equal block_size ({self.block_size})")
            unknown = sorted(set(self.model) - set(BASELINE_FIELDS[self.model_type]))
            if unknown:
                raise ValueError(f"model fields {unknown} do not apply to model_type={self.model_type!r}; its fields "
                                 f"are {sorted(BASELINE_FIELDS[self.model_type])}")
            if self.model_type == "mistral" and not isinstance(self.model.get("sliding_window"), int):
                raise ValueError("model_type='mistral' needs model.sliding_window (an integer number of tokens)")


def group_into_blocks(batch: dict[str, list[list[int]]], block_size: int) -> dict[str, list[list[int]]]:
    """Concatenate token lists and cut them into rows of exactly block_size (the remainder of a map batch is dropped)."""
    stream = [token for ids in batch["input_ids"] for token in ids]
    usable = len(stream) - len(stream) % block_size
    return {"input_ids": [stream[start:start + block_size] for start in range(0, usable, block_size)]}


def build_baseline(config: CLMRunConfig, vocab_size: int, special: dict[str, int]):
    """A same-size transformers model (GPT-2, Llama or Mistral) with the XL model's defaults for unset size fields."""
    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                              MistralForCausalLM)

    from hier_transformers import HierarchicalXLConfig

    defaults = HierarchicalXLConfig()
    fields = BASELINE_FIELDS[config.model_type]
    sizes = {fields[name]: config.model.get(name, getattr(defaults, name, None)) for name in fields}
    if config.model_type == "gpt2":
        model_config = GPT2Config(vocab_size=vocab_size, n_positions=config.block_size, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, **sizes, **special)
        model_class = GPT2LMHeadModel
    else:
        config_class, model_class = {"llama": (LlamaConfig, LlamaForCausalLM),
                                     "mistral": (MistralConfig, MistralForCausalLM)}[config.model_type]
        model_config = config_class(vocab_size=vocab_size, max_position_embeddings=config.block_size,
                                    num_key_value_heads=sizes["num_attention_heads"],
                                    tie_word_embeddings=defaults.tie_word_embeddings, **sizes, **special)
    model_config._attn_implementation = "sdpa"
    return model_class(model_config)


def sum_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of `logits` [B, L, vocab] against the `targets` [B, L] of each position."""
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                             reduction="sum")


class CausalLM:
    task = "causal-lm"
    pipeline_tag = "text-generation"

    def __init__(self, config: CLMRunConfig):
        self.config = config
        self.shuffle_train = not config.stream  # streams come in the order their steps must be read
        self.memory = None  # the stream trainer's carried cache (one row per batch row of this process)

    def final_evaluation(self, folder: Path) -> dict | None:
        return final_evaluation(self.config, folder)

    def build_model(self, config: CLMRunConfig, tokenizer):
        from hier_transformers import HierarchicalXLConfig, HierarchicalXLForCausalLM

        special = {name: getattr(tokenizer, name) for name in ("pad_token_id", "bos_token_id", "eos_token_id")}
        if config.model_type in BASELINE_FIELDS:
            return build_baseline(config, len(tokenizer), special)
        return HierarchicalXLForCausalLM(HierarchicalXLConfig(vocab_size=len(tokenizer), **special, **config.model))

    def build_datasets(self, config: CLMRunConfig, tokenizer, corpus):
        from accelerate import PartialState

        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        if eos is None:
            raise ValueError(f"tokenizer={config.tokenizer!r} has no EOS token to separate documents")
        self.count_bytes = byte_level(tokenizer)
        self.first_byte_id = len(tokenizer.all_special_ids) if self.count_bytes else 0
        prefix = [bos] if bos is not None else []

        def tokenize(texts: list[str]) -> dict[str, list[list[int]]]:
            ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
            return {"input_ids": [prefix + row + [eos] for row in ids]}

        tokenized = corpus.map(tokenize, batched=True, input_columns="text", remove_columns=["text"], desc="tokenize")
        blocks = tokenized.map(group_into_blocks, batched=True, batch_size=1000,
                               fn_kwargs={"block_size": config.block_size}, desc=f"blocks of {config.block_size}")
        for split, part in blocks.items():
            if len(part) == 0:
                raise ValueError(f"the {split} split is shorter than one block of block_size={config.block_size} tokens")
        eval_set = blocks["validation"].with_format("torch")
        if not config.stream:
            return blocks["train"].with_format("torch"), eval_set, None
        train_set = StreamDataset(tokenized["train"]["input_ids"], rows=config.per_device_batch_size,
                                  num_processes=PartialState().num_processes, block_size=config.block_size,
                                  segment_length=config.segment_length, pad_token_id=tokenizer.pad_token_id,
                                  seed=config.seed, **self.copy_targets(config, tokenizer))
        return train_set, eval_set, None

    @staticmethod
    def copy_targets(config: CLMRunConfig, tokenizer) -> dict:
        """The StreamDataset arguments that make it compute `retrieval_labels` (none when the loss is off)."""
        if not config.retrieval_loss_weight:
            return {}
        from hier_transformers import HierarchicalXLConfig

        model_config = HierarchicalXLConfig(vocab_size=len(tokenizer), **config.model)
        return {"copy_match": config.retrieval_match, "config": model_config}

    # ---- the loss of one micro-batch --------------------------------------------------------------------------------
    def block_loss(self, model, input_ids: torch.Tensor, backward=None) -> tuple[torch.Tensor, int]:
        """A [batch, block_size] block on its own (memory empty at its start): summed loss, number of predictions."""
        if self.config.model_type in BASELINE_FIELDS:
            logits = model(input_ids=input_ids).logits[:, :-1]  # [B, block_size - 1, vocab]: the last predicts nothing
            loss = sum_loss(logits, input_ids[:, 1:])
            count = input_ids[:, 1:].numel()
            if backward is not None:
                backward(loss / count)
            return loss.detach(), count
        loss_sum, count, _ = segment_lm_step(model, input_ids, self.config.segment_length, backward=backward)
        return loss_sum, count

    def train_step(self, model, batch: dict, seed: int, backward) -> tuple[float, int]:
        if not self.config.stream:
            loss_sum, n_tokens = self.block_loss(model, batch["input_ids"], backward)
            return float(loss_sum), int(n_tokens)
        loss_sum, n_tokens, self.memory = segment_lm_step(
            model, batch["input_ids"], self.config.segment_length, cache=self.carried_memory(model), backward=backward,
            labels=batch["labels"], attention_mask=batch["attention_mask"], resets=batch["resets"],
            retrieval_labels=batch.get("retrieval_labels"), retrieval_weight=self.config.retrieval_loss_weight)
        return float(loss_sum), n_tokens

    def eval_step(self, model, batch: dict, seed: int):
        input_ids = batch["input_ids"]
        loss_sum, n_tokens = self.block_loss(model, input_ids)
        targets = input_ids[:, 1:]
        num_bytes = (targets >= self.first_byte_id).sum() if self.count_bytes else torch.zeros((), dtype=torch.long)
        return torch.as_tensor(loss_sum, device=input_ids.device), torch.as_tensor(n_tokens, device=input_ids.device), num_bytes

    # ---- the stream memory in checkpoints (exact resume) -------------------------------------------------------------
    def save_state(self, checkpoint: Path, accelerator) -> None:
        if self.config.stream and self.memory is not None:
            from safetensors.torch import save_file

            tensors = {name: tensor.contiguous().cpu() for name, tensor in self.memory.state_dict().items()}
            save_file(tensors, str(Path(checkpoint) / MEMORY_FILE.format(rank=accelerator.process_index)))

    def load_state(self, checkpoint: Path, accelerator) -> None:
        if not self.config.stream:
            return
        path = Path(checkpoint) / MEMORY_FILE.format(rank=accelerator.process_index)
        if not path.is_file():
            raise FileNotFoundError(f"--resume: {path} is missing: this checkpoint does not hold the stream memories "
                                    "of a stream: true run (was it written with stream: false?)")
        from safetensors.torch import load_file

        self.saved_memory = {name: tensor.to(accelerator.device) for name, tensor in load_file(path).items()}

    def carried_memory(self, model):
        """The cache carried from the previous step (restored from a checkpoint on the first step after --resume)."""
        if self.memory is None and getattr(self, "saved_memory", None) is not None:
            from hier_transformers import HierarchicalXLCache

            self.memory = HierarchicalXLCache(getattr(model, "module", model).config)
            self.memory.load_state_dict(self.saved_memory)
            self.saved_memory = None
        return self.memory


def final_evaluation(config: CLMRunConfig, folder: Path) -> dict | None:
    """Whole validation documents, memory carried from each one's first byte, beside bzip2 -9 / xz -9e (None when
    `final_eval` is off or the tokenizer is not byte-level); the result is printed."""
    if not config.final_eval:
        return None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.lm_eval import compressor_bits_per_byte, encode_documents, score_documents

    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    if not byte_level(tokenizer):
        return None
    corpus, _ = load_corpus(config)
    texts = list(corpus["validation"]["text"])
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    kind = {"hierarchical_xl": "hierarchical_xl", "mistral": "sliding"}.get(config.model_type, "full")
    # the XL memory gives the same logits however a document is cut into segments: read long segments (fast)
    scores = score_documents(model, encode_documents(tokenizer, texts), kind, segment_length=EVAL_SEGMENT_LENGTH,
                             context=config.block_size, batch_size=16)
    final = {"bits_per_byte": scores.bits_per_byte(), "by_position": scores.by_position(),
             "documents": len(texts), "bytes": sum(len(text.encode()) for text in texts),
             **compressor_bits_per_byte(texts), "concatenated": compressor_bits_per_byte(["\n\n".join(texts)])}
    print(f"held-out ({final['documents']} documents, {final['bytes']:,} bytes, memory carried): "
          f"{final['bits_per_byte']:.4f} bits per byte; on the same bytes bzip2 -9 "
          f"{final['concatenated']['bzip2_-9']:.4f} and xz -9e {final['concatenated']['xz_-9e']:.4f} (split as "
          f"one file), {final['bzip2_-9']:.4f} and {final['xz_-9e']:.4f} (each document alone)")
    return final


def main(argv: list[str] | None = None) -> dict:
    config, resume = parse_run_args(CLMRunConfig, argv)
    return train(config, CausalLM(config), resume=resume)


if __name__ == "__main__":
    main()
