"""Same-compute comparison of byte-level language models: every run config gets the same training minutes.

For each run config (a YAML of training/pretrain_clm.py: HierarchicalXL, Llama at 512 or 2048, Mistral with a sliding
window, ...), and for each learning rate of the search:

1. calibrate: time a few real training steps of that model in this process (CPU time, one thread: robust to other
   load on the machine) and set ``max_steps = budget / seconds per step`` (warm-up 5% of it), so the cosine schedule
   ends exactly when the budget does;
2. train it with training/pretrain_clm.py in a child process (``--parallel`` at a time, one thread each, side by
   side), same data, same data order, same seed; the child's own CPU time is recorded;
3. keep, per model, the learning rate with the best in-run validation bits per byte, and score its held-out curve
   with training/eval_context.py (all documents of a split, memory carried / reset, bzip2 and xz anchors).

    OMP_NUM_THREADS=1 python training/compare_lm.py --budget_minutes 5 --learning_rates 2e-3 4e-3 \\
        --configs training/configs/xl_news_small.yaml training/configs/llama_news_small.yaml \\
                  training/configs/llama2048_news_small.yaml training/configs/mistral_news_small.yaml \\
        --output_root runs/compare --eval_corpus news --eval_split validation

Writes ``<output_root>/comparison.json`` and ``comparison.md`` (and the curve's PNG); prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from training.common import build_config, load_corpus, load_tokenizer, parse_run_args  # noqa: E402
from training.eval_context import main as eval_context  # noqa: E402
from training.eval_context import table  # noqa: E402
from training.pretrain_clm import CausalLM, CLMRunConfig  # noqa: E402


def seconds_per_step(config: CLMRunConfig, steps: int = 6) -> float:
    """Median CPU seconds of one optimizer step (forward + backward + AdamW) of this config, on its real batches."""
    import torch
    from torch.utils.data import DataLoader

    torch.manual_seed(config.seed)
    objective = CausalLM(config)
    tokenizer = load_tokenizer(config.tokenizer)
    small = build_config(CLMRunConfig, {**config.to_dict(), "max_train_documents": 400, "max_eval_documents": 20})
    corpus, _ = load_corpus(small)
    train_set, _, _ = objective.build_datasets(small, tokenizer, corpus)
    model = objective.build_model(config, tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate)
    loader = iter(DataLoader(train_set, batch_size=config.per_device_batch_size, shuffle=False, drop_last=True))
    times = []
    for _ in range(steps + 1):
        batch = next(loader)
        start = time.process_time()
        for _ in range(config.gradient_accumulation_steps):
            objective.train_step(model, batch, 0, torch.Tensor.backward)
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.process_time() - start)
    return statistics.median(times[1:])


def spec_overrides(spec: str) -> list[tuple[str, str]]:
    """``CONFIG@a=1,model.b=2`` -> [("a", "1"), ("model.b", "2")]."""
    _, _, variant = spec.partition("@")
    pairs = [item.split("=", 1) for item in variant.split(",") if item]
    if any(len(pair) != 2 for pair in pairs):
        raise ValueError(f"config variant {spec!r} must look like CONFIG@field=value,model.field=value")
    return [(key, value) for key, value in pairs]


def read_spec(spec: str) -> tuple[Path, dict]:
    """A run config with a variant's overrides applied, parsed like the command line's ``--key value`` pairs."""
    path = Path(spec.partition("@")[0])
    pairs = spec_overrides(spec)
    config, _ = parse_run_args(CLMRunConfig, ["--config", str(path), *(item for key, value in pairs
                                                                       for item in (f"--{key}", value))])
    values = config.to_dict()
    if pairs and "model_name" not in dict(pairs):
        values["model_name"] += "-" + "-".join(f"{key.split('.')[-1]}{value}" for key, value in pairs)
    return path, values


def run_children(jobs: list[dict], parallel: int) -> None:
    """Run the training commands, `parallel` at a time, one thread each; record each child's CPU and wall time."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(REPO_ROOT)}
    pending, running = list(jobs), {}
    while pending or running:
        while pending and len(running) < parallel:
            job = pending.pop(0)
            log = open(job["log"], "w")
            process = subprocess.Popen(job["command"], cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            running[process.pid] = (job, process, log, time.perf_counter())
        pid, status, usage = os.wait4(-1, 0)
        if pid not in running:
            continue
        job, process, log, started = running.pop(pid)
        log.close()
        job["returncode"] = os.waitstatus_to_exitcode(status)
        job["cpu_seconds"] = usage.ru_utime + usage.ru_stime
        job["wall_seconds"] = time.perf_counter() - started
        print(f"  {job['name']}: rc={job['returncode']}, {job['cpu_seconds']:.0f} CPU s, "
              f"{job['wall_seconds']:.0f} wall s", flush=True)
        if job["returncode"] != 0:
            raise RuntimeError(f"{' '.join(job['command'])} failed; see {job['log']}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", required=True,
                        help="run configs; CONFIG@field=value,model.field=value is a variant of CONFIG")
    parser.add_argument("--budget_minutes", type=float, required=True, help="training CPU minutes per model")
    parser.add_argument("--learning_rates", nargs="*", type=float, default=None,
                        help="the search; default: each config's own learning_rate")
    parser.add_argument("--output_root", type=Path, default=Path("runs/compare"))
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--eval_corpus", default="news", choices=("news", "shakespeare"))
    parser.add_argument("--eval_split", default="validation")
    parser.add_argument("--reset_every", type=int, default=512)
    parser.add_argument("--eval_max_documents", type=int, default=None, help="held-out documents (default: all)")
    parser.add_argument("overrides", nargs=argparse.REMAINDER, help="--key value pairs applied to every config")
    args = parser.parse_args(argv)
    if args.budget_minutes <= 0:
        parser.error("--budget_minutes must be > 0")
    args.output_root.mkdir(parents=True, exist_ok=True)
    overrides = args.overrides[1:] if args.overrides[:1] == ["--"] else args.overrides

    jobs = []
    for spec in args.configs:
        path, base = read_spec(spec)
        for learning_rate in args.learning_rates or [base.get("learning_rate", 1e-3)]:
            config = build_config(CLMRunConfig, {**base, "learning_rate": learning_rate})
            variant_name = base["model_name"]
            per_step = seconds_per_step(config)
            steps = max(10, int(args.budget_minutes * 60 / per_step))
            name = f"{config.model_name}-lr{learning_rate:g}"
            output_dir = args.output_root / name
            variant = [item for key, value in spec_overrides(spec) for item in (f"--{key}", value)]
            command = [sys.executable, str(REPO_ROOT / "training" / "pretrain_clm.py"), "--config", str(path), *variant,
                       "--learning_rate", str(learning_rate), "--max_steps", str(steps),
                       "--warmup_steps", str(max(1, steps // 20)), "--eval_every", str(max(1, steps // 4)),
                       "--save_every", str(steps), "--output_dir", str(output_dir), "--overwrite_output_dir", "true",
                       "--trackers", "[jsonl]", "--final_eval", "false", "--model_name", variant_name,
                       *overrides]
            jobs.append({"name": name, "config": spec, "model_type": config.model_type,
                         "model_name": config.model_name, "learning_rate": learning_rate,
                         "seconds_per_step": per_step, "max_steps": steps, "output_dir": str(output_dir),
                         "command": command, "log": str(args.output_root / f"{name}.log")})
            print(f"{name}: {per_step:.3f} CPU s per step -> {steps} steps in {args.budget_minutes:g} min", flush=True)
    run_children(jobs, args.parallel)

    for job in jobs:
        summary = json.loads((Path(job["output_dir"]) / "final" / "run_summary.json").read_text())
        job["in_run_eval"] = summary["eval"]
        job["tokens_seen"] = summary["tokens_seen"]
    best = {}
    for job in jobs:
        current = best.get(job["config"])
        if current is None or job["in_run_eval"]["bits_per_byte"] < current["in_run_eval"]["bits_per_byte"]:
            best[job["config"]] = job


    folders = [str(Path(job["output_dir"]) / "final") for job in best.values()]
    limit = ["--max_documents", str(args.eval_max_documents)] if args.eval_max_documents else []
    curve = eval_context([*folders, "--corpus", args.eval_corpus, "--split", args.eval_split,
                          "--reset_every", str(args.reset_every), *limit,
                          "--output", str(args.output_root / "curve.json"),
                          "--plot", str(args.output_root / "curve.png")])
    results = {"budget_minutes": args.budget_minutes, "learning_rates": args.learning_rates,
               "overrides": overrides, "runs": jobs, "best": {config: job["name"] for config, job in best.items()},
               "held_out": curve}
    lines = [f"Same compute: {args.budget_minutes:g} CPU minutes of training per model (one thread each).", "",
             "| model | lr | steps | bytes seen | train CPU min | in-run val bpb (blocks) | held-out bpb (95% CI) |",
             "|---|---|---|---|---|---|---|"]
    for job in jobs:
        held = ""
        if best[job["config"]] is job:
            curves = curve["models"][job["model_name"]]["curves"]
            first = next(iter(curves.values()))
            held = f"**{first['bits_per_byte']:.3f}** ({first['interval_95'][0]:.3f}–{first['interval_95'][1]:.3f})"
        lines.append(f"| {job['model_name']} | {job['learning_rate']:g} | {job['max_steps']} | {job['tokens_seen']:,} | "
                     f"{job['cpu_seconds'] / 60:.1f} | {job['in_run_eval']['bits_per_byte']:.3f} | {held} |")
    anchors = curve["compressors_concatenated"]
    lines += ["", f"Anchors on the same held-out bytes (whole split as one file): bzip2 -9 {anchors['bzip2_-9']:.3f}, "
              f"xz -9e {anchors['xz_-9e']:.3f}."]
    markdown = "\n".join(lines)
    print(markdown)
    (args.output_root / "comparison.md").write_text(markdown + "\n\nHeld-out curve:\n\n" + table(curve) + "\n")
    (args.output_root / "comparison.json").write_text(json.dumps(results, indent=2, default=str))
    return results


if __name__ == "__main__":
    main()
