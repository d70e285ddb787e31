"""Passkey retrieval (Mohtashami & Jaggi, 2023): can the model give back 5 digits it read `distance` bytes ago?

The prompt is the paper's: an instruction, a haystack of held-out real text (the validation split of the embedded
Shakespeare works or news articles, never the training split), the key sentence "The pass key is 68048. Remember
it. 68048 is the pass key." placed so that it starts `distance` bytes before the question, more haystack, and
"What is the pass key? The pass key is". The model answers greedily; a trial counts when the first 5 digits it writes
are the key (exact match; chance is 1e-5). `digits` is the fraction of key digits right, position by position.

    python training/passkey.py runs/xl_passkey/final --distances 1024 4096 16384 65536 --trials 50
    python training/passkey.py runs/xl_passkey/final --baseline runs/mistral_passkey/final --baseline runs/llama/final

A HierarchicalXL checkpoint with retrieval on is also scored with retrieval off (`retrieval_top_k = 0`, same
weights: the ablation). A baseline whose `max_position_embeddings` is shorter than a prompt gets no score there.
Prompts are prefilled in chunks of `--chunk` tokens with the model's cache, then 5+ tokens are decoded greedily.
The table goes to stdout, the numbers to `--output` (JSON).

Training data for the passkey curriculum (JSON Lines with a `text` column, for `pretrain_clm.py --data_files`):

    python training/passkey.py --write-training-data data/passkey_train.jsonl --distances 16 64 256 1024 \
        --documents 4000 --real-text-fraction 0.3

Each passkey document is the same prompt followed by the answer (" 68048."), haystack from the *training* split;
distances are drawn with weights halving from the shortest (a curriculum within one stream: short ones dominate;
`--distance-weights` sets them);
a `--real-text-fraction` of the documents are plain training text.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import random
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there.\n"
)
KEY_SENTENCE = "The pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\nWhat is the pass key? The pass key is"
LEAD_BYTES = 128  # haystack between the instruction and the key sentence
DEFAULT_DISTANCES = (1024, 4096, 16384, 65536)
DRILL_SENTENCES = 30
STRING_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"  # random strings of the induction drills


def load_haystack(corpus: str, split: str) -> str:
    """The `split` of an embedded corpus as one ASCII string (non-ASCII dropped, so characters are bytes)."""
    from hier_transformers.data import load_news_articles, load_shakespeare

    dataset = (load_shakespeare() if corpus == "shakespeare" else load_news_articles())[split]
    text = "\n\n".join(dataset["text"])
    return text.encode("ascii", "ignore").decode("ascii")


def filler(haystack: str, length: int, rng: random.Random) -> str:
    """`length` consecutive bytes of the haystack from a random offset (wrapping around)."""
    if length <= 0:
        return ""
    repeats = -(-length // len(haystack)) + 1
    start = rng.randrange(len(haystack))
    return (haystack * repeats)[start : start + length]


def build_prompt(key: str, distance: int, haystack: str, rng: random.Random) -> tuple[str, int]:
    """The passkey prompt with the key sentence starting `distance` bytes before the question (or right after the
    instruction when the key sentence alone is longer) -> (prompt, the actual distance)."""
    sentence = KEY_SENTENCE.format(key=key)
    after = filler(haystack, max(distance - len(sentence), 0), rng)
    prompt = INTRO + filler(haystack, LEAD_BYTES, rng) + sentence + after + QUESTION
    return prompt, len(sentence) + len(after)


def random_key(rng: random.Random) -> str:
    return f"{rng.randrange(10_000, 100_000)}"


def score_answer(answer: str, key: str) -> tuple[bool, float]:
    """(exact match of the first 5 digits written, fraction of the key's digits right by position)."""
    digits = "".join(character for character in answer if character.isdigit())[: len(key)]
    right = sum(a == b for a, b in zip(digits, key))
    return digits == key, right / len(key)


@torch.no_grad()
def greedy_answer(model, tokenizer, prompt: str, new_tokens: int, chunk: int) -> str:
    """Prefill `prompt` in chunks through the model's cache, then decode `new_tokens` greedily."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(model.device)
    cache, logits = None, None
    for start in range(0, ids.shape[1], chunk):  # `cache` is every model's argument in transformers 5
        output = model(ids[:, start : start + chunk], cache=cache, use_cache=True, logits_to_keep=1)
        cache, logits = output.cache, output.logits[:, -1]
    answer = []
    for _ in range(new_tokens):
        token = logits.argmax(-1, keepdim=True)
        answer.append(int(token))
        output = model(token, cache=cache, use_cache=True)
        cache, logits = output.cache, output.logits[:, -1]
    return tokenizer.decode(answer, skip_special_tokens=True)


def context_limit(model) -> int | None:
    """The longest prompt a model can read (None: unbounded, as HierarchicalXL and sliding-window models)."""
    if model.config.model_type in ("hierarchical_xl", "mistral"):
        return None
    return getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)


@torch.no_grad()
def copy_loss(model, tokenizer, seed: int, drills: int = 10, gap: int = 0, haystack: str = "") -> float:
    """Copying, the skill far recall builds on: the mean loss (nats) of the digits of each key's *second* mention in
    held-out copy drills (`copy_drill`; chance ln 10 = 2.30). `gap=0`: the copy of the first mention from a fixed
    20 bytes back (a positional copy solves it); `gap > 0`: induction drills, the copy 23..23 + gap bytes back behind
    `haystack` bytes (only a content lookup solves it; past the window, through retrieval)."""
    rng = random.Random(f"{seed}-copy" if gap == 0 else f"{seed}-induction-{gap}")
    losses = []
    for _ in range(drills):
        text = copy_drill(rng, 10, gap=gap, haystack=haystack)
        ids = tokenizer(text, return_tensors="pt")["input_ids"].to(model.device)
        logits = model(ids, use_cache=False).logits[0, :-1].float()
        token_loss = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
        offset, start = ids.shape[1] - len(text), 0  # a leading BOS, if the tokenizer adds one
        for _ in range(10):
            first = text.index("The pass key is ", start) + len("The pass key is ")
            second = text.index(text[first : first + 5], first + 5)
            losses.append(token_loss[offset + second - 1 : offset + second + 4])  # predicting the 5 digits
            start = second + 5
    return float(torch.cat(losses).mean())


@contextlib.contextmanager
def recorded_choices():
    """While inside, every HierarchicalXL layer's retrieval choice is appended to the yielded list, one
    [positions (padded), k] tensor of patch indices per layer call (-1: no choice)."""
    from hier_transformers.modeling_hierarchical_xl import HierarchicalXLAttention

    chosen, select = [], HierarchicalXLAttention.select_patches

    def recording(self, logits, plan):
        spots, real, best = select(self, logits, plan)
        patches = plan.select_index.gather(1, spots.flatten(1)).view_as(spots)
        chosen.append(torch.where(real, patches, -1).flatten(0, 1))  # [positions (padded), k], -1: none
        return spots, real, best

    HierarchicalXLAttention.select_patches = recording
    try:
        yield chosen
    finally:
        HierarchicalXLAttention.select_patches = select


def answered_prompt(model, tokenizer, rng: random.Random, distance: int, haystack: str, end: str = ""):
    """A fresh key's prompt followed by its answer (" <key>" + `end`), tokenized on the model's device -> ids [1, n]
    and the token positions where each of the key's two mentions in the prompt starts."""
    key = random_key(rng)
    prompt, _ = build_prompt(key, distance, haystack, rng)
    text = f"{prompt} {key}{end}"
    ids = tokenizer(text, return_tensors="pt")["input_ids"].to(model.device)
    offset, first = ids.shape[1] - len(text), text.index(key)  # offset: a leading BOS, if the tokenizer adds one
    return ids, (offset + first, offset + text.index(key, first + 1))


@torch.no_grad()
def selection_hits(model, tokenizer, distance: int, trials: int, haystack: str, seed: int) -> list[float]:
    """Per layer, the fraction of answer queries (the ones predicting the 5 digits) whose chosen patches include a
    patch holding a digit of the key (either mention): does retrieval look in the right place? One uncached
    forward over prompt + answer per trial, the layers' choices recorded."""
    rng, patch = random.Random(f"{seed}-{distance}"), model.config.patch_size
    hits = torch.zeros(model.config.num_hidden_layers)
    with recorded_choices() as chosen:
        for _ in range(trials):
            ids, mentions = answered_prompt(model, tokenizer, rng, distance, haystack, end=".")
            key_patches = {(mention + i) // patch for mention in mentions for i in range(5)}
            chosen.clear()
            model(ids, use_cache=False)
            queries = range(ids.shape[1] - 7, ids.shape[1] - 2)  # the inputs after which a digit comes
            for layer, picks in enumerate(chosen):
                hits[layer] += sum(bool(key_patches & set(picks[q].tolist())) for q in queries) / 5
    return (hits / trials).tolist()


@torch.no_grad()
def digit_probe(model, tokenizer, distance: int, trials: int, haystack: str, seed: int) -> dict[str, list]:
    """Where a far copy breaks, digit by digit (teacher forced: the true digits are fed, each prediction read). One
    uncached forward over prompt + key per trial. -> "teacher_forced": per answer digit, how often the model predicts
    it; for a HierarchicalXL model with retrieval on also "target_patch_chosen": per layer and answer digit, how often
    the query predicting digit i chose a patch holding digit i of either mention (can the layer read it at all?)."""
    retrieval = model.config.model_type == "hierarchical_xl" and model.config.retrieval_top_k > 0
    rng = random.Random(f"{seed}-digits-{distance}")
    right = torch.zeros(5)
    layers = model.config.num_hidden_layers if retrieval else 0
    hits = torch.zeros(layers, 5)
    with recorded_choices() as chosen:  # stays empty without retrieval
        for _ in range(trials):
            ids, mentions = answered_prompt(model, tokenizer, rng, distance, haystack)
            chosen.clear()
            logits = model(ids, use_cache=False).logits[0]
            queries = range(ids.shape[1] - 6, ids.shape[1] - 1)  # the inputs after which digit i comes
            right += (logits[queries.start : queries.stop].argmax(-1) == ids[0, -5:]).float().cpu()
            for layer, picks in enumerate(chosen):
                for digit, query in enumerate(queries):
                    wanted = {(mention + digit) // model.config.patch_size for mention in mentions}
                    hits[layer, digit] += bool(wanted & set(picks[query].tolist()))
    probe = {"teacher_forced": (right / trials).tolist(), "trials": trials}
    if retrieval:
        probe["target_patch_chosen"] = (hits / trials).tolist()
    return probe


def evaluate(
    model, tokenizer, distances, trials: int, haystack: str, seed: int, chunk: int, first_trial: int = 0
) -> dict[str, dict]:
    """Exact match and digit accuracy per distance; the same keys and haystack offsets for every model (`seed`).
    `first_trial`: score trials `first_trial` .. `first_trial + trials - 1` of each distance's sequence (the earlier
    ones drawn and skipped), so one long evaluation can be split across processes and its counts added."""
    limit = context_limit(model)
    results = {}
    for distance in distances:
        rng = random.Random(f"{seed}-{distance}")
        drawn = ((key, build_prompt(key, distance, haystack, rng)[0]) for key in iter(lambda: random_key(rng), None))
        exact, digits, skipped, started = 0, 0.0, False, time.perf_counter()
        progress = tqdm(itertools.islice(drawn, first_trial, first_trial + trials), total=trials,
                        desc=f"{distance:,} B", unit="trial", leave=False)
        for key, prompt in progress:
            new_tokens = len(tokenizer(" " + key, add_special_tokens=False)["input_ids"]) + 1
            if limit is not None and len(tokenizer(prompt)["input_ids"]) + new_tokens > limit:
                skipped = True
                break
            hit, right = score_answer(greedy_answer(model, tokenizer, prompt, new_tokens, chunk), key)
            exact, digits = exact + hit, digits + right
            progress.set_postfix(exact=exact, refresh=False)
        progress.close()
        results[str(distance)] = (
            {"exact_match": None, "digits": None, "trials": 0, "note": f"beyond the context ({limit} tokens)"}
            if skipped
            else {"exact_match": exact / trials, "digits": digits / trials, "trials": trials,
                  "seconds_per_trial": (time.perf_counter() - started) / trials}
        )
    return results


def load(folder: str, weights: str | None = None):
    """A saved model folder and its tokenizer; `weights`: a safetensors state dict (a training checkpoint's
    `model.safetensors`) loaded over the folder's weights, for learning curves."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hier_transformers  # noqa: F401  registers the package's classes (remote code works as well)
    from training.common import load_initial_weights

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    if weights is not None:
        load_initial_weights(model, weights, argument="--weights")
    return model, tokenizer


def markdown(rows: dict[str, dict], distances) -> str:
    notes = []
    header = "| model | " + " | ".join(f"{d} B" for d in distances) + " | in-window copy | induction copy |"
    lines = [header, "|" + "---|" * (len(distances) + 3)]
    for name, results in rows.items():
        cells = []
        for distance in distances:
            result = results[str(distance)]
            cells.append("n/a" if result["exact_match"] is None else
                         f"{result['exact_match']:.2f} ({result['digits']:.2f})")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {results['copy_loss']:.2f} | "
                     f"{results.get('induction_loss', float('nan')):.2f} |")
        for distance, rates in results.get("selection_hits", {}).items():
            notes.append(f"{name}: key patch chosen at {distance} B, per layer: "
                         + " / ".join(f"{rate:.2f}" for rate in rates))
        for distance, probe in results.get("digit_probe", {}).items():
            notes.append(f"{name}: at {distance} B, teacher forced, digits 1-5 right: "
                         + " / ".join(f"{rate:.2f}" for rate in probe["teacher_forced"])
                         + "".join(f"; layer {layer + 1} chose digit i's patch: " + " / ".join(f"{r:.2f}" for r in rates)
                                   for layer, rates in enumerate(probe.get("target_patch_chosen", []))))
    return "\n".join(lines) + ("\n\nexact match (digit accuracy); chance: 0.00001 (0.10). In-window copy: loss (nats) "
                               "of a key's second mention in held-out copy drills, 20 bytes back; induction copy: the same 23-39 bytes "
                               "back behind haystack (a content lookup); chance 2.30, copying ~0") \
        + "".join(f"\n{note}" for note in notes)


def as_llama(mistral):
    """The same weights as a Llama: full attention, context `max_position_embeddings` (the block it trained on).
    Mistral is Llama plus a sliding window, so a Mistral trained with a window >= its blocks trained exactly this
    model: one training run gives both peers of the table."""
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
              "pad_token_id", "bos_token_id", "eos_token_id", "hidden_act")
    config = LlamaConfig(**{name: getattr(mistral.config, name) for name in fields},
                         rope_parameters=mistral.config.rope_parameters, head_dim=mistral.config.head_dim)
    llama = LlamaForCausalLM(config).eval()
    missing, unexpected = llama.load_state_dict(mistral.state_dict(), strict=False)
    if set(missing) - {"lm_head.weight"} or unexpected:
        raise ValueError(f"the Mistral weights do not fit a Llama: missing {missing}, unexpected {unexpected}")
    llama.tie_weights()
    return llama


def row_name(checkpoint: str, weights: str | None = None) -> str:
    """<run>/<folder> of the weights a row scores: a training checkpoint's (<run>/checkpoints/step_N/model.safetensors
    -> <run>/step_N), another run's final weights (<run>/final/model.safetensors -> <run>/final), or CHECKPOINT's."""
    folder = Path(weights).parent if weights else Path(checkpoint)
    run = folder.parent.parent if folder.parent.name == "checkpoints" else folder.parent
    return f"{run.name or checkpoint}/{folder.name}"


def cache_slots_per_layer(config) -> int:
    """Key/value slots one layer of a HierarchicalXL cache holds (tokens + patch and section summaries): a sliding-
    window peer with this window holds the same bytes (same hidden size, fp32, one key and one value per slot)."""
    from hier_transformers.cache_hierarchical_xl import cached_slots

    return sum(cached_slots(config).values())


def scored_rows(model, tokenizer, name: str, args, haystack: str) -> dict[str, dict]:
    """The rows of one model: itself and, for a HierarchicalXL model with retrieval on, the same weights with it off."""
    def score() -> dict:
        return (evaluate(model, tokenizer, args.distances, args.trials, haystack, args.seed, args.chunk,
                         args.first_trial)
                | {"copy_loss": copy_loss(model, tokenizer, args.seed),
                   "induction_loss": copy_loss(model, tokenizer, args.seed, gap=16, haystack=haystack)})

    rows = {name: score()}
    if args.selection is not None and getattr(model.config, "retrieval_top_k", 0) > 0:
        rows[name]["selection_hits"] = {
            str(distance): selection_hits(model, tokenizer, distance, 10, haystack, args.seed)
            for distance in args.selection
        }
    if args.digits is not None:
        rows[name]["digit_probe"] = {str(distance): digit_probe(model, tokenizer, distance, 30, haystack, args.seed)
                                     for distance in args.digits}
    if model.config.model_type == "hierarchical_xl" and model.config.retrieval_top_k > 0 and not args.no_ablation:
        top_k = model.config.retrieval_top_k
        model.config.retrieval_top_k = 0  # the same weights, summaries and window only
        rows[name.replace(")", ", retrieval off)")] = score()
        model.config.retrieval_top_k = top_k
    return rows


def read_time(args) -> dict:
    """The HierarchicalXL config fields the command line may set for reading (None = the checkpoint's own): knobs no
    weight has a shape for: the cache bound (selection is position-free), the recency prior, the patches each layer
    reads."""
    return {"retrieval_window": args.retrieval_window, "retrieval_recency": args.retrieval_recency,
            "retrieval_top_k": args.retrieval_top_k}


def run_benchmark(args) -> dict:
    haystack = load_haystack(args.corpus, "validation")
    rows, notes, equal_window = {}, [], None
    # the checkpoint, or each of its training checkpoints (a learning curve); only its cache budget with --only-baselines
    for weights in [None] if args.only_baselines else args.weights or [None]:
        model, tokenizer = load(args.checkpoint, weights)
        if model.config.model_type == "hierarchical_xl":
            model.config.update({name: value for name, value in read_time(args).items() if value is not None})
            model.config.validate()
            equal_window = cache_slots_per_layer(model.config)
            notes.append(f"{Path(args.checkpoint).name}: cache {equal_window:,} slots per layer "
                         f"(retrieval_window {model.config.retrieval_window:,}, top {model.config.retrieval_top_k})")
        torch.manual_seed(0)
        name = f"{row_name(args.checkpoint, weights)} ({model.config.model_type})"
        if name in rows:
            raise ValueError(f"--weights: two rows would both be named {name!r}; pass each weights file once")
        if not args.only_baselines:
            rows |= scored_rows(model, tokenizer, name, args, haystack)
    for folder in args.baseline:
        model, tokenizer = load(folder)
        name = f"{Path(folder).parent.name or folder}/{Path(folder).name}"
        if model.config.model_type == "mistral":
            if equal_window is not None:
                model.config.sliding_window = equal_window  # the same cache bytes as the HierarchicalXL model
                notes.append(f"{name}: sliding_window {equal_window:,} (equal cache bytes)")
            torch.manual_seed(0)
            rows |= scored_rows(as_llama(model), tokenizer, f"{name} (as llama: full attention up to "
                                f"{model.config.max_position_embeddings})", args, haystack)
        torch.manual_seed(0)
        rows |= scored_rows(model, tokenizer, f"{name} ({model.config.model_type})", args, haystack)
    table = markdown(rows, args.distances) + "".join(f"\n{note}" for note in dict.fromkeys(notes))
    print(table)
    summary = {"checkpoint": args.checkpoint, "weights": args.weights, "distances": args.distances,
               "trials": args.trials, "first_trial": args.first_trial, "corpus": args.corpus, **read_time(args),
               "results": rows, "notes": notes, "table": table}
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(summary, indent=2))
    return summary


def copy_drill(
    rng: random.Random, sentences: int = DRILL_SENTENCES, gap: int = 0, haystack: str = "", strings: float = 0.0
) -> str:
    """A copy drill: key sentences with fresh keys, back to back. Each key's second mention is a copy of its first
    from a few bytes back (inside the local window): exact copying is learned here before it is needed far away.

    With `gap > 0` an induction drill instead: "The pass key is K. " + 0..gap bytes of haystack + "The pass key is
    K.", so the copy sits at a varying distance (23 to 23 + gap bytes back) and only a content lookup ("the token after
    the previous 'is '", then "after the previous '6'") finds it, never a fixed offset; past the local window the
    first mention is read through retrieval, where the same lookup has to work.

    `strings`: the fraction of an induction drill's pairs that are a random string of 4..12 lowercase letters and
    digits, haystack, the string again: 3 to 11 of its bytes are copies (a key sentence's 5 of 40), the dense signal
    in which induction (content) copying forms; the key sentences tie it to the passkey's words."""
    if gap <= 0:
        return "".join(KEY_SENTENCE.format(key=random_key(rng)) for _ in range(sentences))
    pairs = []
    for _ in range(sentences):
        if rng.random() < strings:
            text = "".join(rng.choice(STRING_ALPHABET) for _ in range(rng.randint(4, 12)))
            first, second = f"{text} ", f" {text}\n"
        else:
            key = random_key(rng)
            first, second = f"The pass key is {key}. ", f"The pass key is {key}.\n"
        pairs.append(first + filler(haystack, rng.randint(0, gap), rng) + second)
    return "".join(pairs)


def write_training_data(args) -> int:
    """Passkey documents (prompt + answer), copy drills and plain text, as JSON Lines; returns the number of
    documents."""
    rng = random.Random(args.seed)
    haystack = load_haystack(args.corpus, "train")
    weights = args.distance_weights or [0.5**index for index in range(len(args.distances))]
    path = Path(args.write_training_data)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as out:
        for _ in range(args.documents):
            distance = rng.choices(args.distances, weights)[0]
            kind = rng.random()
            if kind < args.real_text_fraction:
                text = filler(haystack, distance + LEAD_BYTES + len(INTRO), rng)
            elif kind < args.real_text_fraction + args.drill_fraction:
                text = copy_drill(rng, gap=args.drill_gap, haystack=haystack, strings=args.drill_strings)
            else:
                key = random_key(rng)
                prompt, _ = build_prompt(key, distance, haystack, rng)
                text = f"{prompt} {key}."
            out.write(json.dumps({"text": text}) + "\n")
    return args.documents


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", nargs="?", help="a saved model folder (with its tokenizer)")
    parser.add_argument("--weights", nargs="+", help="training checkpoints' model.safetensors to load over "
                        "CHECKPOINT's weights, one row each (a learning curve)")
    parser.add_argument("--retrieval-window", type=int, help="score a HierarchicalXL checkpoint with this retrieval "
                        "window (the cache bound; a Mistral baseline gets the same cache bytes as its sliding window)")
    parser.add_argument("--retrieval-recency", type=float, help="score a HierarchicalXL checkpoint with this "
                        "selection logit lost per patch of age (its config's retrieval_recency otherwise)")
    parser.add_argument("--retrieval-top-k", type=int, help="score a HierarchicalXL checkpoint reading this many "
                        "patches per layer (its config's retrieval_top_k otherwise; the ablation row still reads none)")
    parser.add_argument("--no-ablation", action="store_true", help="skip the retrieval-off rows")
    parser.add_argument("--only-baselines", action="store_true",
                        help="score only the baselines (CHECKPOINT still sets the equal-cache sliding window)")
    parser.add_argument("--selection", type=int, nargs="+", metavar="DISTANCE",
                        help="also record, per layer, how often retrieval chose a patch of the key (10 trials each)")
    parser.add_argument("--digits", type=int, nargs="+", metavar="DISTANCE",
                        help="also probe digit by digit, teacher forced (30 trials each): which answer digits each model "
                        "gets, and per layer whether the query of digit i chose a patch holding digit i")
    parser.add_argument("--baseline", action="append", default=[], help="another checkpoint folder (repeatable)")
    parser.add_argument("--distances", type=int, nargs="+", default=list(DEFAULT_DISTANCES))
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--corpus", choices=("shakespeare", "news"), default="shakespeare")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--first-trial", type=int, default=0, help="score trials FIRST_TRIAL.. of each distance's "
                        "sequence (the keys a run with more trials would score after the first FIRST_TRIAL): split "
                        "a long evaluation across processes and add the counts")
    parser.add_argument("--chunk", type=int, default=2048, help="prefill chunk (tokens)")
    parser.add_argument("--output", help="JSON file for the results")
    parser.add_argument("--write-training-data", metavar="JSONL", help="write passkey training documents instead")
    parser.add_argument("--distance-weights", type=float, nargs="+", metavar="WEIGHT",
                        help="training data: how often each of --distances is drawn (default: halving from the first)")
    parser.add_argument("--documents", type=int, default=4000)
    parser.add_argument("--real-text-fraction", type=float, default=0.3)
    parser.add_argument("--drill-fraction", type=float, default=0.0,
                        help=f"fraction of copy drills ({DRILL_SENTENCES} key sentences with fresh keys, back to back)")
    parser.add_argument("--drill-gap", type=int, default=0,
                        help="0: copy drills are key sentences back to back (a copy from a fixed 20 bytes back); N > 0: "
                             "induction drills, the copy 23 to 23 + N bytes back behind 0..N bytes of haystack")
    parser.add_argument("--drill-strings", type=float, default=0.0,
                        help="fraction of an induction drill's pairs that are random strings (dense copies) instead "
                             "of key sentences (needs --drill-gap > 0)")
    args = parser.parse_args(argv)
    if args.drill_gap < 0:
        parser.error("--drill-gap must be >= 0")
    if not 0.0 <= args.drill_strings <= 1.0 or args.drill_strings and not args.drill_gap:
        parser.error("--drill-strings must be in [0, 1], and > 0 only for induction drills (--drill-gap > 0)")
    if (args.checkpoint is None) == (args.write_training_data is None):
        parser.error("give a CHECKPOINT to evaluate, or --write-training-data JSONL")
    if any(distance < 1 for distance in args.distances) or args.trials < 1:
        parser.error("--distances and --trials must be >= 1")
    if args.first_trial < 0:
        parser.error("--first-trial must be >= 0 (0: the sequence from its start)")
    if args.distance_weights is not None and (
        len(args.distance_weights) != len(args.distances) or min(args.distance_weights) < 0
        or not sum(args.distance_weights) > 0
    ):
        parser.error(f"--distance-weights needs one weight >= 0 per distance ({len(args.distances)} distances, "
                     f"{len(args.distance_weights)} weights) and a positive sum")
    if not 0.0 <= args.real_text_fraction < 1.0 or not 0.0 <= args.drill_fraction < 1.0 - args.real_text_fraction:
        parser.error("--real-text-fraction and --drill-fraction must be >= 0 and leave room for passkey documents "
                     "(their sum < 1)")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.write_training_data:
        count = write_training_data(args)
        print(json.dumps({"documents": count, "path": args.write_training_data}))
    else:
        run_benchmark(args)


if __name__ == "__main__":
    main()
