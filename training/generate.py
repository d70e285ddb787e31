"""Stream text from a trained HierarchicalXL checkpoint folder (or Hub repo id).

`generate` carries the model's segment memory (HierarchicalXLCache: a fixed local window of keys/values plus patch and
section summaries), so memory and per-token time stay flat however long the generation runs.

    python training/generate.py runs/xl_news_small/final --prompt "The government said" --max_new_tokens 400
    python training/generate.py runs/xl_news_small/final --prompt "Markets" --greedy
    python training/generate.py runs/xl_news_small/final --prompt ""    # unconditional: starts from the BOS token
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer


def load(checkpoint: str):
    model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=True)
    return model.eval(), tokenizer


def generate(model, tokenizer, prompt: str, max_new_tokens: int = 300, greedy: bool = False, temperature: float = 0.8,
             top_p: float = 0.95, seed: int = 0, stream: bool = True) -> str:
    """Generate a continuation of ``prompt`` (printed as it is produced when ``stream``); returns the new text.

    An empty prompt starts from the BOS token (the model needs at least one token to condition on)."""
    torch.manual_seed(seed)
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    if inputs["input_ids"].shape[1] == 0:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start is None:
            raise ValueError("An empty --prompt needs a tokenizer with a BOS (or EOS) token to start from; give a prompt.")
        inputs = {"input_ids": torch.tensor([[start]]), "attention_mask": torch.ones(1, 1, dtype=torch.long)}
    streamer = TextStreamer(tokenizer, skip_prompt=False, skip_special_tokens=True) if stream else None
    sampling = {} if greedy else {"do_sample": True, "temperature": temperature, "top_p": top_p}
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, streamer=streamer,
                                pad_token_id=tokenizer.pad_token_id, **({"do_sample": False} if greedy else sampling))
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a folder written by pretrain_clm.py (runs/<name>/final) or a Hub repo id")
    parser.add_argument("--prompt", default="The ")
    parser.add_argument("--max_new_tokens", type=int, default=300)
    parser.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top_p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error("--max_new_tokens must be >= 1")
    checkpoint = Path(args.checkpoint)
    if checkpoint.is_dir() and not (checkpoint / "config.json").is_file() and (checkpoint / "final").is_dir():
        checkpoint = checkpoint / "final"  # a run folder: use its final model
    model, tokenizer = load(str(checkpoint))
    generate(model, tokenizer, args.prompt, args.max_new_tokens, args.greedy, args.temperature, args.top_p, args.seed)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
