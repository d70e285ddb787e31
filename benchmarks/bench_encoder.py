"""Encoder speed and memory: `HierarchicalModel` against randomly initialised peers of the same width and depth.

Peers (all from `transformers`): BERT with SDPA (full attention; its position table is grown to the
length), Longformer (sliding window `--attention-window`, 512), BigBird (block-sparse, block 64, 3 random
blocks), ModernBERT (SDPA, its default local 128 / global every 3rd layer alternation).

For every (model, length) a fresh process builds the model, then measures
- ``forward``: a forward pass under `torch.no_grad()` (eval mode);
- ``train``: one training step: forward, loss = mean(last_hidden_state**2), backward, AdamW step.
Time is the median over the timed repeats after a warm-up; memory is the peak growth over the
measurement (weights and inputs excluded; optimizer state and gradients included for ``train``).

    python benchmarks/bench_encoder.py                       # CPU, 1k..16k, writes results/encoder_cpu.*
    python benchmarks/bench_encoder.py --quick               # tiny smoke run
    python benchmarks/bench_encoder.py --device cuda --dtype bf16 --lengths 4096 16384 65536 131072
    python benchmarks/bench_encoder.py --compare-top-down    # top_down "none" vs "summary_keys", one process
"""

from __future__ import annotations

import argparse
import json
import sys
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
    time_calls,
    torch_dtype,
)

OURS = "hierarchical"
PEERS = ("longformer", "bigbird", "modernbert", "bert")  # BERT last: on a capped GPU run it is the slowest
EFFICIENT_PEERS = ("longformer", "bigbird", "modernbert")  # the "best of" the targets compare against
LABELS = {
    OURS: "hierarchical (ours)",
    "bert": "BERT (sdpa, full)",
    "longformer": "Longformer",
    "bigbird": "BigBird (block sparse)",
    "modernbert": "ModernBERT (sdpa)",
}
TARGET_SPEEDUP, TARGET_MEMORY_FRACTION, TARGET_SLOPE, TARGET_LENGTH = 3.0, 1 / 3, 1.1, 16384


# ----------------------------------------------------------------------------------------------------
# worker: build one model, measure it
# ----------------------------------------------------------------------------------------------------


def zero_dropout(config) -> None:
    """Every model is measured without dropout, so that no model pays for random masks the others skip."""
    for name, value in config.to_dict().items():
        if ("dropout" in name or name.endswith("pdrop")) and isinstance(value, float):  # GPT-2: attn_pdrop, ...
            setattr(config, name, 0.0)


def build_model(spec: dict):
    """The model named by `spec["model"]`, randomly initialised, width/depth from the spec."""
    from transformers import (
        AutoModel,
        BertConfig,
        BigBirdConfig,
        LongformerConfig,
        ModernBertConfig,
    )

    size = dict(
        vocab_size=spec["vocab_size"],
        hidden_size=spec["hidden_size"],
        num_hidden_layers=spec["num_layers"],
        num_attention_heads=spec["num_heads"],
        intermediate_size=spec["intermediate_size"],
    )
    length, name = spec["length"], spec["model"]
    if name == OURS:
        (HierarchicalConfig,) = import_ours("configuration_hierarchical", "HierarchicalConfig")
        (HierarchicalModel,) = import_ours("modeling_hierarchical", "HierarchicalModel")
        config = HierarchicalConfig(**size, **spec["ours_config"])
        zero_dropout(config)
        config._attn_implementation = spec["attn_implementation"]
        return HierarchicalModel(config)
    if name == "bert":
        config = BertConfig(**size, max_position_embeddings=max(512, length))
    elif name == "longformer":
        window = spec["attention_window"]
        config = LongformerConfig(**size, attention_window=window, max_position_embeddings=length + window + 2)
    elif name == "bigbird":
        config = BigBirdConfig(
            **size, attention_type="block_sparse", block_size=64, num_random_blocks=3,
            max_position_embeddings=max(4096, length),
        )
    elif name == "modernbert":
        special = dict(pad_token_id=0, bos_token_id=1, cls_token_id=1, eos_token_id=2, sep_token_id=2)
        config = ModernBertConfig(**size, **special, max_position_embeddings=max(8192, length))
    else:
        raise ValueError(f"unknown model {name!r}; choose from {(OURS, *PEERS)}")
    zero_dropout(config)
    # Longformer and BigBird implement their own attention: they accept only "eager".
    implementation = "eager" if name in ("longformer", "bigbird") else "sdpa"
    return AutoModel.from_config(config, attn_implementation=implementation, add_pooling_layer=False) if name in (
        "bert", "bigbird") else AutoModel.from_config(config, attn_implementation=implementation)


def measure(spec: dict, length: int) -> list[dict]:
    """Build the model for `length` tokens and measure every mode of the spec on it."""
    import torch

    device, dtype = spec["device"], torch_dtype(spec["dtype"])
    base = {"model": spec["model"], "length": length, "device": device, "dtype": spec["dtype"]}
    try:
        model = build_model({**spec, "length": length}).to(device=device, dtype=dtype)
    except Exception as error:  # a peer that cannot be built at this length is reported, not dropped
        status = "oom" if is_out_of_memory(error) else "error"
        return [{**base, "mode": mode, "status": status, "detail": f"{type(error).__name__}: {error}"[:300]}
                for mode in spec["modes"]]
    parameters = sum(p.numel() for p in model.parameters())
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, spec["vocab_size"], (1, length), generator=generator).to(device)
    attention_mask = torch.ones_like(input_ids)

    def forward() -> torch.Tensor:
        return model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step() -> None:
        loss = forward().float().pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    records = []
    for mode in spec["modes"]:
        record = {**base, "mode": mode, "parameters": parameters}
        model.train(mode == "train")
        try:
            with PeakMemory(device) as memory, torch.set_grad_enabled(mode == "train"):
                timing = time_calls(
                    train_step if mode == "train" else forward,
                    device, spec["warmup"], spec["repeats"], spec["budget_s"],
                )
            record.update(status="ok", **timing, peak_bytes=memory.bytes, memory_method=memory.method)
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            record.update(status="oom", detail=f"{type(error).__name__}: {error}"[:300])
            optimizer.zero_grad(set_to_none=True)
        records.append(record)
    del model, optimizer
    if device == "cuda":
        torch.cuda.empty_cache()
    return records


def worker(spec: dict) -> None:
    """Measure one model at every length of the spec (ascending); after an OOM, longer lengths are skipped."""
    setup_torch(spec["device"], spec["threads"])
    base = {"model": spec["model"], "device": spec["device"], "dtype": spec["dtype"]}
    failed = None
    for length in sorted(spec["lengths"]):
        if failed:
            for mode in spec["modes"]:
                emit(skip_record(base, length, mode, failed))
            continue
        for record in measure(spec, length):
            emit(record)
            if record["status"] == "oom":
                failed = {"status": "oom", "length": length}


# ----------------------------------------------------------------------------------------------------
# parent: run every case, summarise, write JSON / markdown / PNG
# ----------------------------------------------------------------------------------------------------


def summarise(records: list[dict], lengths: list[int]) -> dict:
    """Slopes of our model from 4k up, and ratios to the best efficient peer at 16k, with the targets."""
    index = {(r["model"], r["length"], r["mode"]): r for r in records}

    def value(model: str, length: int, mode: str, key: str) -> float | None:
        record = index.get((model, length, mode))
        return record.get(key) if record and record.get("status") == "ok" else None

    summary: dict = {"slopes": {}, "ratios": {}, "targets": {}}
    long_lengths = [length for length in lengths if length >= 4096]
    for mode in ("forward", "train"):
        for key, label in (("median_s", "time"), ("peak_bytes", "memory")):
            points = [(length, value(OURS, length, mode, key)) for length in long_lengths]
            slope = loglog_slope(points)
            summary["slopes"][f"{mode}_{label}"] = None if slope is None else round(slope, 3)
    # per-peer ratios at every length (peer / ours: > 1 means ours is faster or smaller)
    for length in lengths:
        for mode in ("forward", "train"):
            for peer in PEERS:
                for key, label in (("median_s", "speedup"), ("peak_bytes", "memory_ratio")):
                    ours, theirs = value(OURS, length, mode, key), value(peer, length, mode, key)
                    if ours and theirs:
                        summary["ratios"][f"{mode}_{label}_vs_{peer}@{length}"] = round(theirs / ours, 2)
    if TARGET_LENGTH in lengths:
        for mode in ("forward", "train"):
            for key, label in (("median_s", "speedup"), ("peak_bytes", "memory_ratio")):
                ours = value(OURS, TARGET_LENGTH, mode, key)
                peers = {p: value(p, TARGET_LENGTH, mode, key) for p in EFFICIENT_PEERS}
                peers = {p: v for p, v in peers.items() if v}
                if ours and peers:
                    best = min(peers, key=peers.get)
                    summary["targets"][f"{mode}_{label}_vs_best@16k"] = {
                        "best_peer": best, "ratio": round(peers[best] / ours, 2),
                    }
        targets = summary["targets"]
        checks = {
            "forward >= 3x faster than best efficient peer @16k": ("forward_speedup_vs_best@16k", TARGET_SPEEDUP),
            "train step >= 3x faster than best efficient peer @16k": ("train_speedup_vs_best@16k", TARGET_SPEEDUP),
            "forward peak memory <= 1/3 of best efficient peer @16k": (
                "forward_memory_ratio_vs_best@16k", 1 / TARGET_MEMORY_FRACTION),
        }
        summary["checks"] = {
            name: (targets[key]["ratio"] >= threshold if key in targets else None)
            for name, (key, threshold) in checks.items()
        }
    slopes = summary["slopes"]
    summary.setdefault("checks", {})
    for name in ("forward_time", "forward_memory"):
        summary["checks"][f"{name} log-log slope (4k..max) <= {TARGET_SLOPE}"] = (
            None if slopes.get(name) is None else slopes[name] <= TARGET_SLOPE
        )
    return summary


def report_stem(args) -> Path:
    return Path(args.out_dir) / f"encoder_{args.device}{args.suffix}"


def write_reports(records: list[dict], summary: dict, args, settings: dict) -> Path:
    stem = report_stem(args)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(
        {"settings": settings, "summary": summary, "records": records}, indent=1))
    index = {(r["model"], r["length"], r["mode"]): r for r in records}
    models = [m for m in (OURS, *PEERS) if m in args.models]
    size = f"hidden {args.hidden_size}, {args.num_layers} layers, {args.num_heads} heads, ffn {args.intermediate_size}"
    lines = [f"# Encoder benchmark ({args.device}, {args.dtype}, batch 1; {size})", ""]
    env = settings["environment"]
    lines.append(f"torch {env['torch']}, transformers {env['transformers']}, "
                 f"{env.get('gpu', f'{args.threads} CPU thread(s)')}. `*` = a single (warm-up) call, slower than the "
                 "time budget. Memory = peak growth over the measurement (weights and inputs excluded).")
    for mode, title in (("forward", "Forward pass"), ("train", "Training step (fwd + bwd + AdamW)")):
        for key, what, formatter in (("median_s", "median time", format_seconds),
                                     ("peak_bytes", "peak memory", format_bytes)):
            header = ["tokens", *[LABELS[m] for m in models]]
            rows = [[format_length(length), *[cell(index.get((m, length, mode)), key, formatter) for m in models]]
                    for length in args.lengths]
            lines += ["", f"## {title}: {what}", "", markdown_table(header, rows)]
        header = ["tokens", *[f"{LABELS[p]}: time / mem" for p in PEERS if p in models]]
        rows = []
        for length in args.lengths:
            row = [format_length(length)]
            for peer in (p for p in PEERS if p in models):
                speed = summary["ratios"].get(f"{mode}_speedup_vs_{peer}@{length}")
                memory = summary["ratios"].get(f"{mode}_memory_ratio_vs_{peer}@{length}")
                row.append(" / ".join("-" if ratio is None else f"{ratio}x" for ratio in (speed, memory)))
            rows.append(row)
        lines += ["", f"## {title}: peer / ours (above 1 = ours faster / smaller)", "", markdown_table(header, rows)]
    lines += ["", "## Targets", "", f"Slopes of our model (log-log, 4k..{format_length(max(args.lengths))}): "
              + ", ".join(f"{k} {v}" for k, v in summary["slopes"].items()), ""]
    for name, ratio in summary["targets"].items():
        lines.append(f"- {name}: {ratio['ratio']}x (best peer: {LABELS[ratio['best_peer']]})")
    for name, met in summary["checks"].items():
        lines.append(f"- {name}: {'met' if met else 'NOT met' if met is False else 'not measured'}")
    failures = [r for r in records if r.get("status") != "ok"]
    if failures:
        lines += ["", "## Cases without a number", ""]
        lines += [f"- {LABELS[r['model']]} @ {format_length(r['length'])} {r['mode']}: {r['status']}"
                  f" ({r.get('detail', '')})" for r in failures]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")

    panels = []
    for mode in ("forward", "train"):
        for key, ylabel in (("median_s", "seconds"), ("peak_bytes", "peak bytes")):
            series = {LABELS[m]: [(length, (index.get((m, length, mode)) or {}).get(key)) for length in args.lengths
                                  if (index.get((m, length, mode)) or {}).get("status") == "ok"] for m in models}
            panels.append({"title": f"{mode}: {'time' if key == 'median_s' else 'memory'}", "ylabel": ylabel,
                           "series": series})
    loglog_plot(stem.with_suffix(".png"), panels, f"Encoder, {args.device} {args.dtype}, {size}")
    return stem


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                        help="fp32 on cpu, bf16 on cuda by default")
    parser.add_argument("--lengths", type=int, nargs="+", default=None, help="default 1k 2k 4k 8k 16k")
    parser.add_argument("--models", nargs="+", default=[OURS, *PEERS], choices=[OURS, *PEERS])
    parser.add_argument("--modes", nargs="+", default=["forward", "train"], choices=["forward", "train"])
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--intermediate-size", type=int, default=1024)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--attention-window", type=int, default=512, help="Longformer's window")
    parser.add_argument("--ours-config", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra HierarchicalConfig fields (JSON values), e.g. patch_size=32 section_size=16")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per measurement (default 1)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget-s", type=float, default=15.0, help="time budget for the timed repeats of a mode")
    parser.add_argument("--case-timeout", type=float, default=300.0,
                        help="kill a measurement process after this many seconds (per length)")
    parser.add_argument("--max-memory-gb", type=float, default=12.0, help="CPU address-space cap per process")
    parser.add_argument("--suffix", default="", help="appended to the output file names")
    parser.add_argument("--out-dir", default=str(RESULTS_DIR), help="where the JSON / markdown / PNG go")
    parser.add_argument("--group", choices=("case", "model"), default=None,
                        help="one process per (model, length) [cpu default: exact memory] or per model [cuda default]")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the markdown and PNG from the existing JSON (measures nothing)")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (short lengths, small model)")
    args = parser.parse_args(argv)
    if args.quick:
        args.lengths = args.lengths or [512, 1024, 4096]
        args.hidden_size, args.num_layers, args.intermediate_size = 64, 2, 128
        args.repeats, args.budget_s, args.suffix = 2, 2.0, args.suffix or "_quick"
    args.lengths = args.lengths or [1024, 2048, 4096, 8192, 16384]
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    args.group = args.group or ("model" if args.device == "cuda" else "case")
    return args


def parse_overrides(pairs: list[str]) -> dict:
    overrides = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise SystemExit(f"--ours-config expects KEY=VALUE, got {pair!r}")
        try:
            overrides[key] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key] = raw
    return overrides


def compare_top_down(argv: list[str]) -> None:
    """Forward time of our encoder with `top_down="none"` (old layout) and `"summary_keys"` (default), measured in
    ONE process, interleaved, so that machine load hits both alike; prints the medians and their ratio.

        python benchmarks/bench_encoder.py --compare-top-down [--length 16384 --repeats 11 --threads 1]
    """
    import statistics
    import time

    import torch

    parser = argparse.ArgumentParser(prog="bench_encoder.py --compare-top-down")
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    (HierarchicalConfig,) = import_ours("configuration_hierarchical", "HierarchicalConfig")
    (HierarchicalModel,) = import_ours("modeling_hierarchical", "HierarchicalModel")
    kinds = ("none", "summary_keys")
    models = {}
    for kind in kinds:
        torch.manual_seed(0)
        config = HierarchicalConfig(vocab_size=8192, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                    intermediate_size=1024, top_down=kind)
        zero_dropout(config)
        config._attn_implementation = "sdpa"
        models[kind] = HierarchicalModel(config).eval()
    input_ids = torch.randint(5, 8192, (1, args.length), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    with torch.no_grad():
        for kind in kinds:  # warm-up
            models[kind](input_ids)
        for _ in range(args.repeats):
            for kind in kinds:
                start = time.perf_counter()
                models[kind](input_ids)
                times[kind].append(time.perf_counter() - start)
    medians = {kind: statistics.median(values) for kind, values in times.items()}
    print(json.dumps({"length": args.length, "threads": args.threads, "repeats": args.repeats,
                      "median_s": medians, "ratio_summary_keys_over_none": medians["summary_keys"] / medians["none"]}))


def main(argv: list[str]) -> None:
    if argv[:1] == ["--worker"]:
        worker(json.loads(argv[1]))
        return
    if argv[:1] == ["--compare-top-down"]:
        compare_top_down(argv[1:])
        return
    args = parse_args(argv)
    if args.report_only:
        saved = json.loads(report_stem(args).with_suffix(".json").read_text())
        kept = {"out_dir": args.out_dir, "suffix": args.suffix}
        args = argparse.Namespace(**{**saved["settings"], **kept})
        print(write_reports(saved["records"], summarise(saved["records"], args.lengths), args, saved["settings"]))
        return
    common = dict(
        device=args.device, dtype=args.dtype, vocab_size=args.vocab_size, hidden_size=args.hidden_size,
        num_layers=args.num_layers, num_heads=args.num_heads, intermediate_size=args.intermediate_size,
        attention_window=args.attention_window, ours_config=parse_overrides(args.ours_config),
        attn_implementation="sdpa", threads=args.threads, warmup=args.warmup, repeats=args.repeats,
        budget_s=args.budget_s, modes=args.modes,
    )
    models = [model for model in (OURS, *PEERS) if model in args.models]
    settings = dict(vars(args), environment=environment_info(args.device))

    def report(records: list[dict]) -> Path:
        return write_reports(records, summarise(records, args.lengths), args, settings)

    run_all_cases(Path(__file__), common, models, args.lengths, args, report, "encoder")
    stem = report_stem(args)
    print(stem.with_suffix(".md").read_text())
    print(f"wrote {stem}.json/.md/.png")


if __name__ == "__main__":
    main(sys.argv[1:])
