"""Held-out bits per byte of the XL and GPT-2 final checkpoints and of a unigram byte model, on the same validation
blocks that training/pretrain_clm.py evaluates (blocks of block_size from the validation split, in order).

    OMP_NUM_THREADS=1 python training/compare_lm.py runs/compare/xl_news_small runs/compare/gpt2_news_small \\
        > runs/compare/results.json
"""
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from training.common import bits_per_byte, build_config, load_corpus, load_tokenizer, read_metrics  # noqa: E402
from training.pretrain_clm import CausalLM, CLMRunConfig  # noqa: E402


def evaluate(objective, model, loader, max_batches=None):
    totals = torch.zeros(3, dtype=torch.float64)
    with torch.no_grad():
        for index, batch in enumerate(loader):
            if max_batches is not None and index >= max_batches:
                break
            totals += torch.stack([value.double() for value in objective.eval_step(model, batch, 0)])
    nll, tokens, num_bytes = totals.tolist()
    return {"bits_per_byte": bits_per_byte(nll, num_bytes), "loss": nll / tokens, "predictions": int(tokens),
            "bytes": int(num_bytes)}


def unigram(train_set, loader, vocab_size, first_byte_id, max_batches=None):
    counts = torch.ones(vocab_size, dtype=torch.float64)  # add-one smoothing
    counts += torch.bincount(train_set[:]["input_ids"].reshape(-1), minlength=vocab_size).double()
    log_probs = (counts / counts.sum()).log()
    nll, tokens, num_bytes = 0.0, 0, 0
    for index, batch in enumerate(loader):
        if max_batches is not None and index >= max_batches:
            break
        targets = batch["input_ids"][:, 1:]
        nll -= float(log_probs[targets].sum())
        tokens += targets.numel()
        num_bytes += int((targets >= first_byte_id).sum())
    return {"bits_per_byte": nll / num_bytes / math.log(2), "loss": nll / tokens, "predictions": tokens,
            "bytes": num_bytes}


def wall_clock(log):
    lines = [line for line in log.read_text().splitlines() if "Elapsed (wall clock)" in line] if log.exists() else []
    return lines[-1].split("): ")[-1].strip() if lines else None


results = {"runs": {}}
for run_dir in map(Path, sys.argv[1:]):
    summary = json.loads((run_dir / "final" / "run_summary.json").read_text())
    config = build_config(CLMRunConfig, dict(summary["run_config"]))
    objective = CausalLM(config)
    tokenizer = load_tokenizer(config.tokenizer)
    corpus, _ = load_corpus(config)
    train_set, eval_set, _ = objective.build_datasets(config, tokenizer, corpus)
    loader = DataLoader(eval_set, batch_size=config.per_device_batch_size)
    model = AutoModelForCausalLM.from_pretrained(run_dir / "final", trust_remote_code=True).eval()
    metrics = read_metrics(run_dir / "logs" / "metrics.jsonl")
    train_records = [record for record in metrics if "train/loss" in record]
    start = time.perf_counter()
    full = evaluate(objective, model, loader)
    results["runs"][config.model_type] = {
        "model_name": config.model_name, "output_dir": str(run_dir),
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": summary["steps"], "tokens_seen": summary["tokens_seen"],
        "process_wall_clock": wall_clock(Path(str(run_dir) + ".log")),  # /usr/bin/time -v of the training command
        "final_train_loss": summary["train_loss"],
        "eval_in_run": summary["eval"],  # max_eval_batches of the run config
        "eval_full_validation": full, "eval_full_validation_s": time.perf_counter() - start,
        "eval_curve": [{"step": r["step"], "bits_per_byte": r["eval/bits_per_byte"]} for r in metrics
                       if "eval/bits_per_byte" in r],
        "mean_logged_tokens_per_second": sum(r["train/tokens_per_second"] for r in train_records) / len(train_records),
        "run_config": summary["run_config"],
    }
    results["validation_blocks"] = {"block_size": config.block_size, "blocks": len(eval_set),
                                    "in_run_batches": config.max_eval_batches,
                                    "batch_size": config.per_device_batch_size}
    results["unigram"] = {
        "in_run_batches": unigram(train_set, loader, len(tokenizer), objective.first_byte_id, config.max_eval_batches),
        "full_validation": unigram(train_set, loader, len(tokenizer), objective.first_byte_id),
    }
print(json.dumps(results, indent=2))
