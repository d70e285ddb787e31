"""Generation speed and cache size as the context grows, and training throughput, against same-size peers.

Models (byte-level vocabulary, same width and depth, randomly initialised):
- ``hierarchical_xl`` (ours): `HierarchicalXLForCausalLM`; the context is prefilled for real, segment by
  segment through ``model(input_ids=segment, cache=cache)``, so its `HierarchicalXLCache` is what a real
  stream would hold.
- ``hierarchical_xl_retrieval`` (ours with coarse-to-fine retrieval, docs/retrieval.md): the same model with
  `--retrieval-config` (default: top 4 patches out of a 64k-token retrieval window, held in a ring buffer),
  prefilled for real the same way.
- ``gpt2`` (full KV cache, ``n_positions`` grown to the context), ``llama`` (full KV cache,
  `DynamicCache`), ``mistral`` (sliding window `--sliding-window`, 4096).
  Peers' caches are filled by ``--peer-prefill``: ``real`` (chunked prefill, exact) or ``synthetic``
  (a `DynamicCache` filled with random keys/values of exactly the shape a real prefill leaves: a decode
  step's cost depends on the cache's shape, not its values; this saves the O(context^2) prefill of the
  full-attention peers on CPU). Default: synthetic on CPU, real on CUDA.

Measured per (model, context): the median per-token decode latency over `--decode-steps` greedy steps
after the prefill (after 2 untimed steps), and the bytes of every tensor the cache holds afterwards.
Training throughput: tokens/s of one training step (forward with labels, backward, AdamW) at
`--train-length` tokens, ours against GPT-2 trained identically.

    python benchmarks/bench_generation.py                   # CPU, 1k..64k, writes results/generation_cpu.*
    python benchmarks/bench_generation.py --quick
    python benchmarks/bench_generation.py --device cuda --dtype bf16

Only the decode rows, keeping the training records of the last run (about 6 minutes on one idle core, most of it the
real 64k prefill with retrieval):

    python benchmarks/bench_generation.py --no-train --append
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from harness import (
    RESULTS_DIR,
    PeakMemory,
    cell,
    emit,
    environment_info,
    format_bytes,
    format_length,
    format_seconds,
    import_ours,
    is_out_of_memory,
    loglog_plot,
    loglog_slope,
    markdown_table,
    run_all_cases,
    skip_record,
    setup_torch,
    synchronize,
    time_calls,
    torch_dtype,
)
from bench_encoder import parse_overrides, zero_dropout

OURS = "hierarchical_xl"
OURS_RETRIEVAL = "hierarchical_xl_retrieval"
OURS_MODELS = (OURS, OURS_RETRIEVAL)
PEERS = ("gpt2", "llama", "mistral")
LABELS = {
    OURS: "hierarchical-XL (ours)",
    OURS_RETRIEVAL: "hierarchical-XL + retrieval (ours)",
    "gpt2": "GPT-2 (full cache)",
    "llama": "Llama (full cache)",
    "mistral": "Mistral (sliding window)",
}
TARGET_SLOPE, TARGET_LATENCY_SPEEDUP, TARGET_CACHE_RATIO, TARGET_TRAIN_SPEEDUP = 0.1, 3.0, 10.0, 2.0
TARGET_CONTEXT = 16384


# ----------------------------------------------------------------------------------------------------
# worker
# ----------------------------------------------------------------------------------------------------


def build_model(spec: dict, positions: int):
    """The causal LM named by `spec["model"]`, randomly initialised, able to address `positions` positions."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig

    hidden, layers, heads, ffn = spec["hidden_size"], spec["num_layers"], spec["num_heads"], spec["intermediate_size"]
    vocab, name = spec["vocab_size"], spec["model"]
    special = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if name in OURS_MODELS:
        (HierarchicalXLConfig,) = import_ours("configuration_hierarchical_xl", "HierarchicalXLConfig")
        (HierarchicalXLForCausalLM,) = import_ours("modeling_hierarchical_xl", "HierarchicalXLForCausalLM")
        fields = spec["ours_config"] | (spec["retrieval_config"] if name == OURS_RETRIEVAL else {})
        config = HierarchicalXLConfig(
            vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
            intermediate_size=ffn, **fields,
        )
        zero_dropout(config)
        config._attn_implementation = "sdpa"
        return HierarchicalXLForCausalLM(config)
    if name == "gpt2":
        config = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_inner=ffn,
                            n_positions=positions, **special)
    elif name in ("llama", "mistral"):
        kwargs = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=heads, intermediate_size=ffn, max_position_embeddings=positions, **special)
        config = LlamaConfig(**kwargs) if name == "llama" else MistralConfig(**kwargs,
                                                                            sliding_window=spec["sliding_window"])
    else:
        raise ValueError(f"unknown model {name!r}; choose from {(*OURS_MODELS, *PEERS)}")
    zero_dropout(config)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def tensor_bytes(obj, seen: set | None = None) -> int:
    """Bytes of every distinct tensor reachable from `obj` (attributes, lists, tuples, dicts)."""
    import torch

    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(value, seen) for value in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(value, seen) for value in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return sum(tensor_bytes(value, seen) for value in vars(obj).values())
    return 0


def synthetic_cache(model, length: int, dtype, device: str):
    """A `DynamicCache` holding random keys/values of the shape a real prefill of `length` tokens leaves."""
    import torch
    from transformers import DynamicCache

    config = model.config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = config.hidden_size // config.num_attention_heads
    cache = DynamicCache(config=config)
    for layer_idx in range(config.num_hidden_layers):
        keys = torch.randn(1, heads, length, head_dim, dtype=dtype, device=device)
        cache.update(keys, torch.randn_like(keys), layer_idx)
    return cache


def decode_worker(spec: dict, model, record: dict) -> None:
    import torch

    device, dtype, context, steps = spec["device"], torch_dtype(spec["dtype"]), spec["length"], spec["decode_steps"]
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, spec["vocab_size"], (1, context), generator=generator).to(device)
    model.eval()
    with torch.no_grad():
        start = time.perf_counter()
        cache = None
        if spec["model"] not in OURS_MODELS and spec["peer_prefill"] == "synthetic":
            cache = synthetic_cache(model, context, dtype, device)
            next_token = tokens[:, -1:]
        else:
            for begin in range(0, context, spec["prefill_chunk"]):
                output = model(input_ids=tokens[:, begin: begin + spec["prefill_chunk"]], cache=cache, use_cache=True)
                cache = output.cache
            next_token = output.logits[:, -1:].argmax(-1)
        synchronize(device)
        record["prefill_s"] = round(time.perf_counter() - start, 3)
        latencies = []
        for step in range(steps + 2):
            start = time.perf_counter()
            output = model(input_ids=next_token, cache=cache, use_cache=True)
            cache = output.cache
            next_token = output.logits[:, -1:].argmax(-1)
            synchronize(device)
            if step >= 2:  # two untimed warm-up steps
                latencies.append(time.perf_counter() - start)
    record.update(
        status="ok",
        median_s=statistics.median(latencies),
        times_s=latencies,
        cache_bytes=tensor_bytes(cache),
        cache_tokens=context + steps + 2,
    )
    for name in ("nbytes", "memory_bytes", "num_bytes", "size_in_bytes"):
        reported = getattr(cache, name, None)
        if reported is not None:
            record["cache_bytes_reported"] = int(reported() if callable(reported) else reported)
            break


def train_worker(spec: dict, model, record: dict) -> None:
    import torch

    device, length = spec["device"], spec["length"]
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, spec["vocab_size"], (1, length), generator=generator).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def step() -> None:
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with PeakMemory(device) as memory:
        timing = time_calls(step, device, spec["warmup"], spec["repeats"], spec["budget_s"])
    record.update(status="ok", **timing, tokens_per_s=length / timing["median_s"], peak_bytes=memory.bytes)


def worker(spec: dict) -> None:
    """Measure one model at every length of the spec (ascending); after an OOM, longer lengths are skipped."""
    import torch

    setup_torch(spec["device"], spec["threads"])
    mode = spec["modes"][0]
    base = {key: spec[key] for key in ("model", "device", "dtype")}
    failed = None
    for length in sorted(spec["lengths"]):
        if failed:
            emit(skip_record(base, length, mode, failed))
            continue
        record = {**base, "length": length, "mode": mode}
        try:
            model = build_model(spec, length + spec["decode_steps"] + 8)
            model = model.to(device=spec["device"], dtype=torch_dtype(spec["dtype"]))
            record["parameters"] = sum(p.numel() for p in model.parameters())
            (decode_worker if mode == "decode" else train_worker)({**spec, "length": length}, model, record)
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            record.update(status="oom", detail=f"{type(error).__name__}: {error}"[:300])
            failed = {"status": "oom", "length": length}
        model = None
        if spec["device"] == "cuda":
            torch.cuda.empty_cache()
        emit(record)


# ----------------------------------------------------------------------------------------------------
# parent
# ----------------------------------------------------------------------------------------------------


def summarise(records: list[dict], contexts: list[int]) -> dict:
    index = {(r["model"], r["length"], r["mode"]): r for r in records}

    def value(model: str, length: int, mode: str, key: str):
        record = index.get((model, length, mode))
        return record.get(key) if record and record.get("status") == "ok" else None

    summary: dict = {"slopes": {}, "ratios": {}, "checks": {}}
    long_contexts = [c for c in contexts if c >= 4096]
    for key, label in (("median_s", "latency"), ("cache_bytes", "cache_bytes")):
        for model in (*OURS_MODELS, *PEERS):
            slope = loglog_slope([(c, value(model, c, "decode", key)) for c in long_contexts])
            summary["slopes"][f"{model}_{label}"] = None if slope is None else round(slope, 3)
    for context in contexts:
        for model, prefix in ((OURS, ""), (OURS_RETRIEVAL, "retrieval_")):
            for peer in PEERS:
                for key, label in (("median_s", "latency_speedup"), ("cache_bytes", "cache_ratio")):
                    ours, theirs = value(model, context, "decode", key), value(peer, context, "decode", key)
                    if ours and theirs:
                        summary["ratios"][f"{prefix}{label}_vs_{peer}@{context}"] = round(theirs / ours, 2)
    first, last = min(long_contexts, default=None), max(long_contexts, default=None)
    for model in OURS_MODELS:  # the plain ratio too: time per token at the longest context / at 4k
        low, high = value(model, first, "decode", "median_s"), value(model, last, "decode", "median_s")
        if low and high and last > first:
            summary["ratios"][f"{model}_latency@{last}/@{first}"] = round(high / low, 3)
    train = {m: value(m, length, "train", "tokens_per_s") for (m, length, mode) in index if mode == "train"}
    if train.get(OURS) and train.get("gpt2"):
        summary["ratios"]["train_throughput_vs_gpt2"] = round(train[OURS] / train["gpt2"], 2)
    span = f"4k..{format_length(max(contexts))}"
    checks = summary["checks"]
    for model, which in ((OURS, "our"), (OURS_RETRIEVAL, "our (retrieval on)")):
        for label in ("latency", "cache_bytes"):
            slope = summary["slopes"].get(f"{model}_{label}")
            checks[f"{which} per-token {label} log-log slope ({span}) <= {TARGET_SLOPE}"] = (
                None if slope is None else slope <= TARGET_SLOPE)
    speed = summary["ratios"].get(f"latency_speedup_vs_gpt2@{TARGET_CONTEXT}")
    checks[f"per-token latency >= {TARGET_LATENCY_SPEEDUP:g}x faster than GPT-2 @16k"] = (
        None if speed is None else speed >= TARGET_LATENCY_SPEEDUP)
    ratio = summary["ratios"].get(f"cache_ratio_vs_gpt2@{TARGET_CONTEXT}")
    checks[f"cache >= {TARGET_CACHE_RATIO:g}x smaller than GPT-2 @16k"] = (
        None if ratio is None else ratio >= TARGET_CACHE_RATIO)
    throughput = summary["ratios"].get("train_throughput_vs_gpt2")
    checks[f"training throughput >= {TARGET_TRAIN_SPEEDUP:g}x GPT-2"] = (
        None if throughput is None else throughput >= TARGET_TRAIN_SPEEDUP)
    return summary


def write_reports(records: list[dict], summary: dict, args, settings: dict) -> Path:
    stem = Path(args.out_dir) / f"generation_{args.device}{args.suffix}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(
        {"settings": settings, "summary": summary, "records": records}, indent=1))
    index = {(r["model"], r["length"], r["mode"]): r for r in records}
    models = [m for m in (*OURS_MODELS, *PEERS) if m in args.models]
    size = f"hidden {args.hidden_size}, {args.num_layers} layers, {args.num_heads} heads, vocab {args.vocab_size}"
    env = settings["environment"]
    lines = [f"# Generation benchmark ({args.device}, {args.dtype}, batch 1; {size})", "",
             f"torch {env['torch']}, transformers {env['transformers']}, "
             f"{env.get('gpu', f'{args.threads} CPU thread(s)')}. Peer caches: {args.peer_prefill} prefill; ours: "
             f"real prefill in segments of {args.prefill_chunk}. Latency: median of {args.decode_steps} greedy "
             "steps. Cache: bytes of every tensor the cache holds after the steps. Retrieval: "
             f"{' '.join(getattr(args, 'retrieval_config', []))}."]
    for key, what, formatter in (("median_s", "per-token decode latency", format_seconds),
                                 ("cache_bytes", "cache size", format_bytes)):
        header = ["context", *[LABELS[m] for m in models]]
        rows = [[format_length(c), *[cell(index.get((m, c, "decode")), key, formatter) for m in models]]
                for c in args.contexts]
        lines += ["", f"## {what.capitalize()}", "", markdown_table(header, rows)]
    header = ["context", *[f"{LABELS[p]}: latency / cache" for p in PEERS if p in models]]
    for model, prefix in ((OURS, ""), (OURS_RETRIEVAL, "retrieval_")):
        if model not in models:
            continue
        rows = [[format_length(c), *[" / ".join(
            "-" if (ratio := summary["ratios"].get(f"{prefix}{k}_vs_{p}@{c}")) is None else f"{ratio}x"
            for k in ("latency_speedup", "cache_ratio")) for p in PEERS if p in models]] for c in args.contexts]
        lines += ["", f"## Peer / {LABELS[model]} (above 1 = ours faster / smaller)", "",
                  markdown_table(header, rows)]
    train_rows = []
    for model in (OURS, "gpt2"):
        record = index.get((model, args.train_length, "train"))
        if record is not None:
            train_rows.append([LABELS[model], cell(record, "median_s", format_seconds),
                               cell(record, "tokens_per_s", lambda v: "-" if v is None else f"{v:,.0f}"),
                               cell(record, "peak_bytes", format_bytes)])
    if train_rows:
        lines += ["", f"## Training step at {format_length(args.train_length)} tokens (fwd + bwd + AdamW)", "",
                  markdown_table(["model", "step time", "tokens/s", "peak memory"], train_rows)]
    plain = {k: v for k, v in summary["ratios"].items() if "/@" in k}
    lines += ["", "## Targets", "", "Slopes (log-log, contexts >= 4k): "
              + ", ".join(f"{k} {v}" for k, v in summary["slopes"].items())
              + "".join(f"; {k} {v}" for k, v in plain.items()), ""]
    for name, met in summary["checks"].items():
        lines.append(f"- {name}: {'met' if met else 'NOT met' if met is False else 'not measured'}")
    failures = [r for r in records if r.get("status") != "ok"]
    if failures:
        lines += ["", "## Cases without a number", ""]
        lines += [f"- {LABELS[r['model']]} @ {format_length(r['length'])} {r['mode']}: {r['status']}"
                  f" ({r.get('detail', '')})" for r in failures]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    panels = []
    for key, title, ylabel in (("median_s", "per-token decode latency", "seconds"),
                               ("cache_bytes", "cache size", "bytes")):
        series = {LABELS[m]: [(c, index[(m, c, "decode")].get(key)) for c in args.contexts
                              if index.get((m, c, "decode"), {}).get("status") == "ok"] for m in models}
        panels.append({"title": title, "ylabel": ylabel, "xlabel": "context tokens", "series": series})
    loglog_plot(stem.with_suffix(".png"), panels, f"Generation, {args.device} {args.dtype}, {size}")
    return stem


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                        help="fp32 on cpu, bf16 on cuda by default")
    parser.add_argument("--contexts", type=int, nargs="+", default=None, help="default 1k 4k 16k 64k")
    parser.add_argument("--models", nargs="+", default=[*OURS_MODELS, *PEERS], choices=[*OURS_MODELS, *PEERS])
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--intermediate-size", type=int, default=1024)
    parser.add_argument("--vocab-size", type=int, default=260, help="byte-level vocabulary")
    parser.add_argument("--sliding-window", type=int, default=4096, help="Mistral's window")
    parser.add_argument("--ours-config", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra HierarchicalXLConfig fields (JSON values)")
    parser.add_argument("--retrieval-config", nargs="*", default=["retrieval_top_k=4", "retrieval_window=65536"],
                        metavar="KEY=VALUE", help=f"the retrieval fields of {OURS_RETRIEVAL} (on top of --ours-config)")
    parser.add_argument("--peer-prefill", choices=("real", "synthetic"), default=None)
    parser.add_argument("--prefill-chunk", type=int, default=1024, help="tokens per prefill call")
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--train-length", type=int, default=8192)
    parser.add_argument("--no-train", action="store_true", help="skip the training-throughput measurement")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per measurement (default 1)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed training steps")
    parser.add_argument("--repeats", type=int, default=3, help="timed training steps")
    parser.add_argument("--budget-s", type=float, default=30.0, help="time budget of the timed training steps")
    parser.add_argument("--case-timeout", type=float, default=300.0,
                        help="kill a measurement process after this many seconds (per context)")
    parser.add_argument("--max-memory-gb", type=float, default=12.0, help="CPU address-space cap per process")
    parser.add_argument("--suffix", default="", help="appended to the output file names")
    parser.add_argument("--out-dir", default=str(RESULTS_DIR), help="where the JSON / markdown / PNG go")
    parser.add_argument("--group", choices=("case", "model"), default=None,
                        help="one process per (model, context) [cpu default] or per model [cuda default]")
    parser.add_argument("--no-decode", action="store_true", help="skip the decode measurements")
    parser.add_argument("--append", action="store_true",
                        help="keep the records of the (model, mode) pairs not measured now from the existing JSON")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the markdown and PNG from the existing JSON (measures nothing)")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.contexts = args.contexts or [512, 2048, 4096]
        args.hidden_size, args.num_layers, args.intermediate_size = 64, 2, 128
        args.decode_steps, args.train_length, args.repeats = 8, 1024, 2
        args.suffix = args.suffix or "_quick"
    args.contexts = args.contexts or [1024, 4096, 16384, 65536]
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    args.group = args.group or ("model" if args.device == "cuda" else "case")
    args.peer_prefill = args.peer_prefill or ("real" if args.device == "cuda" else "synthetic")
    return args


def main(argv: list[str]) -> None:
    if argv[:1] == ["--worker"]:
        worker(json.loads(argv[1]))
        return
    args = parse_args(argv)
    if args.report_only:
        saved = json.loads((Path(args.out_dir) / f"generation_{args.device}{args.suffix}.json").read_text())
        kept = {"out_dir": args.out_dir, "suffix": args.suffix}
        args = argparse.Namespace(**{**saved["settings"], **kept})
        print(write_reports(saved["records"], summarise(saved["records"], args.contexts), args, saved["settings"]))
        return
    common = dict(
        device=args.device, dtype=args.dtype, vocab_size=args.vocab_size, hidden_size=args.hidden_size,
        num_layers=args.num_layers, num_heads=args.num_heads, intermediate_size=args.intermediate_size,
        sliding_window=args.sliding_window, ours_config=parse_overrides(args.ours_config),
        retrieval_config=parse_overrides(args.retrieval_config),
        peer_prefill=args.peer_prefill, prefill_chunk=args.prefill_chunk, decode_steps=args.decode_steps,
        threads=args.threads, warmup=args.warmup, repeats=args.repeats, budget_s=args.budget_s,
    )
    models = [m for m in (*OURS_MODELS, *PEERS) if m in args.models]
    trained = [m for m in (OURS, "gpt2") if m in models]
    settings = dict(vars(args), environment=environment_info(args.device))
    records: list[dict] = []
    measured = {(m, "decode") for m in models if not args.no_decode}
    measured |= {(m, "train") for m in trained if not args.no_train}
    previous = Path(args.out_dir) / f"generation_{args.device}{args.suffix}.json"
    if args.append and previous.exists():
        records = [r for r in json.loads(previous.read_text())["records"] if (r["model"], r["mode"]) not in measured]

    def report(new: list[dict]) -> Path:
        return write_reports(records + new, summarise(records + new, args.contexts), args, settings)

    if not args.no_decode:
        records += run_all_cases(Path(__file__), {**common, "modes": ["decode"]}, models, args.contexts, args,
                                 report, "generation")
    if not args.no_train:
        records += run_all_cases(Path(__file__), {**common, "modes": ["train"]}, trained, [args.train_length],
                                 args, report, "training")
    stem = report([])  # every record is in `records` now
    print(stem.with_suffix(".md").read_text())
    print(f"wrote {stem}.json/.md/.png")


if __name__ == "__main__":
    main(sys.argv[1:])
