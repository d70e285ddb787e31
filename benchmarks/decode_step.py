"""Prefill time per 1024 tokens and median per-token decode latency of HierarchicalXL with retrieval (top 4, or
`--top-k`, of a 64k window), on one CPU thread.

A quick before/after check for a change to the retrieval path (the full peer comparison is bench_generation.py):

    git worktree add /tmp/before <commit>
    OMP_NUM_THREADS=1 python benchmarks/decode_step.py --code /tmp/before
    OMP_NUM_THREADS=1 python benchmarks/decode_step.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

JOINT_SHARED = dict(retrieval_softmax="joint", retrieval_shared_choice=True)
READINGS = {"grouped": {}, "joint-shared": JOINT_SHARED, "gated": dict(retrieval_softmax="gated"),
            "joint-shared-choice": JOINT_SHARED | dict(retrieval_choice_query=True)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--code", default=str(Path(__file__).resolve().parents[1]), help="a checkout to import from")
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--top-k", type=int, default=4, help="retrieval_top_k: patches each layer reads (the passkey "
                        "model is read with 6: docs/retrieval.md, run 6)")
    parser.add_argument("--reading", choices=sorted(READINGS), default="grouped", help="how retrieval is read: the "
                        "default's grouped softmax, the passkey model's joint softmax with the first layer's choice "
                        "shared (and with the choice's own query: joint-shared-choice), or the gated branch (the text "
                        "model's); all but grouped need a checkout that has them")
    args = parser.parse_args(argv)
    sys.path.insert(0, args.code)
    from hier_transformers import HierarchicalXLConfig, HierarchicalXLForCausalLM

    torch.manual_seed(0)
    config = HierarchicalXLConfig(vocab_size=260, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                  intermediate_size=1024, retrieval_top_k=args.top_k, retrieval_window=65536,
                                  **READINGS[args.reading])  # a closed gate, a zero choice query (inits): same cost
    model = HierarchicalXLForCausalLM(config).eval()
    for context in args.contexts:
        ids = torch.randint(4, 200, (1, context))
        with torch.no_grad():
            cache, prefill = None, []
            for segment in ids.split(1024, dim=1):
                start = time.perf_counter()
                cache = model(segment, cache=cache, use_cache=True, logits_to_keep=1).cache
                prefill.append(time.perf_counter() - start)
            token, times = ids[:, -1:], []
            for step in range(args.steps + 3):  # 3 untimed
                start = time.perf_counter()
                model(token, cache=cache, use_cache=True)
                if step >= 3:
                    times.append(time.perf_counter() - start)
        print(f"{args.code} ({args.reading}, top {args.top_k}) context {context}: prefill {statistics.median(prefill):.2f} s per 1024 tokens (median), "
              f"decode {statistics.median(times) * 1000:.1f} ms per token (median of {args.steps})")


if __name__ == "__main__":
    main()
