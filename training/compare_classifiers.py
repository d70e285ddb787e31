"""Side-by-side document classification: our MLM checkpoint against our warm start and two MiniLM baselines.

One task config of training/finetune_classification.py (its data, recipe and model fields) trains and scores, one after
another or ``--parallel 2`` at a time (one thread each):

- ``mlm-checkpoint``: the hierarchical classifier from ``--mlm-checkpoint FOLDER`` (``init: FOLDER``);
- ``warm-start``: the same model fields warm-started from MiniLM, no MLM (``init: minilm``);
- ``truncated-minilm``: MiniLM-L6 on the first 512 tokens;
- ``chunked-minilm``: MiniLM over consecutive 512-token chunks, the document's logits the mean of its chunks'.

Each run saves every test document's prediction; this command reads them and reports accuracy and macro-F1 (point
values from our `evaluate` module metrics/accuracy_f1) with 95% percentile-bootstrap intervals over the test
documents, and the paired interval of the difference between the first system and each other one (the same resampled
documents for every system), plus each run's training / prediction CPU minutes.

    OMP_NUM_THREADS=1 python training/compare_classifiers.py --config training/configs/finetune_20ng_all.yaml \\
        --mlm-checkpoint runs/mlm_long_minilm/final --output-dir runs/compare_20ng --parallel 2
    python training/compare_classifiers.py --config training/configs/finetune_news_outlets.yaml \\
        --mlm-checkpoint runs/mlm_long_minilm/final --output-dir runs/compare_news -- --max_train_documents 1000

Anything after the options (``--key value`` pairs, optionally after ``--``) is passed to every run. Writes
``<output-dir>/comparison.json`` and ``comparison.md`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from training.common import parse_run_args  # noqa: E402
from training.compare_lm import run_children  # noqa: E402
from training.finetune_classification import PREDICTIONS_FILE, FinetuneConfig, metrics_function  # noqa: E402

SYSTEMS = {  # name -> the run-config fields that make it (the mlm checkpoint's init is --mlm-checkpoint)
    "mlm-checkpoint": {},
    "warm-start": {"init": "minilm"},
    "truncated-minilm": {"baseline": "truncated-minilm"},
    "chunked-minilm": {"baseline": "chunked-minilm"},
}
METRICS = ("accuracy", "macro_f1")


def bootstrap_indices(num_documents: int, resamples: int, seed: int) -> np.ndarray:
    """[resamples, num_documents] document indices drawn with replacement (the same draws for every system)."""
    return np.random.default_rng(seed).integers(0, num_documents, size=(resamples, num_documents))


def resampled_scores(predictions: np.ndarray, references: np.ndarray, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy and macro-F1 of every resample (rows of ``indices``) -> {"accuracy": [R], "macro_f1": [R]}.

    Macro-F1 as metrics/accuracy_f1 computes it: the mean per-class F1 over the classes that occur in the resample's
    references or predictions."""
    predicted, actual = predictions[indices], references[indices]  # [R, n]
    num_classes = int(max(predictions.max(), references.max())) + 1
    offsets = np.arange(len(indices))[:, None] * num_classes  # [R, 1]: one bincount over (resample, class) pairs

    def counts(classes: np.ndarray) -> np.ndarray:
        return np.bincount(classes.ravel(), minlength=len(indices) * num_classes).reshape(len(indices), num_classes)

    true_positive = counts((offsets + actual)[predicted == actual])  # [R, C]
    total = counts(offsets + predicted) + counts(offsets + actual)  # predicted + actual per class: [R, C]
    f1 = np.divide(2 * true_positive, total, out=np.zeros(total.shape), where=total > 0)
    return {"accuracy": (predicted == actual).mean(axis=1), "macro_f1": f1.sum(axis=1) / (total > 0).sum(axis=1)}


def interval(values: np.ndarray) -> list[float]:
    """The 95% percentile interval of bootstrap values."""
    low, high = np.percentile(values, [2.5, 97.5])
    return [float(low), float(high)]


def score_systems(runs: dict[str, dict], resamples: int = 1000, seed: int = 0) -> dict[str, dict]:
    """{system: {"predictions": [...], "label_ids": [...]}} (the first system is the reference) -> per system the
    point accuracy / macro-F1, their 95% intervals and, for the others, the paired difference (reference - system)
    with its interval."""
    names = list(runs)
    references = np.asarray(runs[names[0]]["label_ids"])
    for name in names:
        if not np.array_equal(np.asarray(runs[name]["label_ids"]), references):
            raise ValueError(f"system {name!r} was scored on other test documents (or in another order) than "
                             f"{names[0]!r}; run every system with the same task config, seed and test set")
    from transformers import EvalPrediction

    compute = metrics_function()
    indices = bootstrap_indices(len(references), resamples, seed)
    samples, scores = {}, {}
    for name in names:
        predictions = np.asarray(runs[name]["predictions"])
        point = compute(EvalPrediction(predictions=predictions, label_ids=references))
        point = {"accuracy": point["accuracy"], "macro_f1": point["f1"]}
        samples[name] = resampled_scores(predictions, references, indices)
        scores[name] = {metric: point[metric] for metric in METRICS}
        scores[name].update({f"{metric}_95": interval(samples[name][metric]) for metric in METRICS})
    for name in names[1:]:
        scores[name]["difference_vs_reference"] = {
            metric: {"value": scores[names[0]][metric] - scores[name][metric],
                     "interval_95": interval(samples[names[0]][metric] - samples[name][metric])}
            for metric in METRICS}
    return scores


def markdown_table(task: str, scores: dict[str, dict], runs: dict[str, dict]) -> str:
    reference = next(iter(scores))

    def with_interval(value: float, bounds: list[float]) -> str:
        return f"{value:.3f} ({bounds[0]:.3f}–{bounds[1]:.3f})"

    lines = [f"{task}: {runs[reference]['test_documents']:,} test documents, "
             f"{runs[reference]['train_documents']:,} training documents; 95% bootstrap intervals over test documents; "
             f"Δ = {reference} minus the system, paired (the same resampled documents).", "",
             f"| system | accuracy | macro-F1 | Δ accuracy | Δ macro-F1 | train CPU min | test CPU min |",
             "|---|---|---|---|---|---|---|"]
    for name, score in scores.items():
        differences = score.get("difference_vs_reference")
        deltas = ["", ""] if differences is None else [
            with_interval(differences[metric]["value"], differences[metric]["interval_95"]) for metric in METRICS]
        lines.append(f"| {name} | {with_interval(score['accuracy'], score['accuracy_95'])} | "
                     f"{with_interval(score['macro_f1'], score['macro_f1_95'])} | {deltas[0]} | {deltas[1]} | "
                     f"{runs[name]['train_cpu_seconds'] / 60:.1f} | {runs[name]['test_cpu_seconds'] / 60:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--config", type=Path, required=True, help="the task's fine-tuning config (YAML)")
    parser.add_argument("--mlm-checkpoint", type=Path, default=None,
                        help="folder of the MLM-pretrained hierarchical checkpoint (needed for mlm-checkpoint)")
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--systems", nargs="+", choices=list(SYSTEMS), default=list(SYSTEMS),
                        help="systems to run; the first is the reference of the paired differences")
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time (one thread each)")
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--bootstrap-seed", type=int, default=0)
    args, overrides = parser.parse_known_args(argv)
    overrides = overrides[1:] if overrides[:1] == ["--"] else overrides
    checkpoint = args.mlm_checkpoint
    if "mlm-checkpoint" in args.systems and not (checkpoint and (checkpoint / "config.json").is_file()):
        parser.error("--mlm-checkpoint must be a folder with config.json when the systems include mlm-checkpoint "
                     f"(got {args.mlm_checkpoint}); or leave mlm-checkpoint out of --systems")
    if args.parallel < 1 or args.resamples < 1:
        parser.error("--parallel and --resamples must be >= 1")
    task, _ = parse_run_args(FinetuneConfig, ["--config", str(args.config), *overrides])  # fails early on a typo
    args.output_dir.mkdir(parents=True, exist_ok=True)

    jobs = []
    for name in args.systems:
        fields = {"init": str(args.mlm_checkpoint)} if name == "mlm-checkpoint" else SYSTEMS[name]
        output_dir = args.output_dir / name
        command = [sys.executable, str(REPO_ROOT / "training" / "finetune_classification.py"), "--config",
                   str(args.config), *(item for key, value in fields.items() for item in (f"--{key}", value)),
                   "--model_name", f"{task.model_name}-{name}", "--output_dir", str(output_dir),
                   "--overwrite_output_dir", "true", "--report_to", "[]", *overrides]
        jobs.append({"name": name, "command": command, "output_dir": str(output_dir),
                     "log": str(args.output_dir / f"{name}.log")})
        print(f"{name}: {' '.join(command)}", flush=True)
    run_children(jobs, args.parallel)

    runs = {}
    for job in jobs:
        final = Path(job["output_dir"]) / "final"
        summary = json.loads((final / "run_summary.json").read_text())
        runs[job["name"]] = {**json.loads((final / PREDICTIONS_FILE).read_text()),
                             "train_documents": summary["train_documents"],
                             "test_documents": summary["validation_documents"],
                             "train_cpu_seconds": summary["train_cpu_seconds"],
                             "test_cpu_seconds": summary["test_cpu_seconds"],
                             "process_cpu_seconds": job["cpu_seconds"], "wall_seconds": job["wall_seconds"],
                             "steps": summary["steps"], "command": job["command"]}
    scores = score_systems(runs, args.resamples, args.bootstrap_seed)
    table = markdown_table(summary["dataset"]["name"], scores, runs)
    results = {"config": str(args.config), "overrides": overrides, "mlm_checkpoint": str(args.mlm_checkpoint),
               "resamples": args.resamples, "bootstrap_seed": args.bootstrap_seed, "dataset": summary["dataset"],
               "systems": {name: {**scores[name], **{key: value for key, value in runs[name].items()
                                                     if key not in ("predictions", "label_ids", "labels")}}
                           for name in scores}}
    print(table)
    (args.output_dir / "comparison.md").write_text(table + "\n")
    (args.output_dir / "comparison.json").write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
