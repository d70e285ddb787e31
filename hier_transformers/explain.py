"""Which sentences and words decided a label: importance from the hierarchy's own attention, aligned to the text.

Method (HAN-style, read off one forward pass with `output_attentions=True`, last layer of each level, heads averaged):

    token importance = (document -> section attention)      the document slot's row of the section level
                     x (section -> patch attention)         each section slot's row of the patch level
                     x (patch pooling weight of the token)  `patch_pooling_weights`; with slot summaries, the patch
                                                            slot's row of the token level

each factor renormalised over the valid units of its level, so every level is a probability distribution and the
token importances sum to 1. Special tokens (no text) are dropped and the rest renormalised. A word's (sentence's)
importance is the sum over the tokens that start inside it. A level that the model's layout never runs counts as
uniform. Only the model's public outputs and `config.patch_size` / `config.section_size` are used, so any saved
checkpoint works, also one loaded with `trust_remote_code=True`.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field

import torch

from .preprocessing import DocumentPreprocessor, sentence_starts

METHOD = (
    "document->section attention x section->patch attention x patch pooling weights (last layer of each level, "
    "heads averaged, renormalised over valid units)"
)
WORD = re.compile(r"\S+\s*")


@dataclass
class Span:
    """A piece of the text, `text[start:end]`, with its importance (the spans of one list sum to 1)."""

    start: int
    end: int
    weight: float


@dataclass
class Explanation:
    """The prediction and the importance of every sentence and word of `text` (spans cover the text exactly)."""

    text: str
    label: str
    label_id: int
    probabilities: dict[str, float]
    sentences: list[Span]
    words: list[Span]
    section_weights: list[float]  # over the document's sections
    patch_weights: list[list[float]]  # per section, over its patches (each sums to 1)
    method: str = METHOD
    patch_texts: list[list[str]] = field(default_factory=list)  # per section, the start of each patch's text

    def top_sentences(self, k: int = 3) -> list[tuple[float, str]]:
        ranked = sorted(self.sentences, key=lambda span: -span.weight)[:k]
        return [(span.weight, self.text[span.start : span.end].strip()) for span in ranked]


def _normalised(weights: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """weights [..., L] >= 0, valid [..., L] bool -> a distribution over the valid entries (uniform if all zero)."""
    weights = weights.float() * valid
    total = weights.sum(-1, keepdim=True)
    uniform = valid.float() / valid.float().sum(-1, keepdim=True).clamp(min=1)
    return torch.where(total > 0, weights / total.clamp(min=1e-30), uniform)


def _spans(text: str, bounds: list[int], token_starts: list[int], token_weights: list[float]) -> list[Span]:
    """Spans [bounds[i], bounds[i + 1]) with the summed weight of the tokens starting inside each."""
    edges = [*bounds, len(text)]
    spans = [Span(edges[i], edges[i + 1], 0.0) for i in range(len(bounds))]
    index = 0
    for start, weight in sorted(zip(token_starts, token_weights)):
        while index + 1 < len(spans) and start >= spans[index + 1].start:
            index += 1
        spans[index].weight += weight
    return spans


@torch.no_grad()
def explain(model, tokenizer, text: str, layout: str = "sentence", max_length: int | None = None) -> Explanation:
    """Explain `model`'s (a hierarchical sequence classifier's) prediction for `text`.

    `tokenizer` must be a fast tokenizer (its offsets map tokens to characters); `layout` is the
    `DocumentPreprocessor` layout (use the one the model was trained with); `max_length` truncates long documents.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError("text must be a non-empty str.")
    config = model.config
    preprocessor = DocumentPreprocessor(tokenizer, config.patch_size, config.section_size, layout=layout,
                                        max_length=max_length, truncation=max_length is not None)
    encoding = preprocessor(text, return_tensors="pt", return_offsets_mapping=True)
    offsets = encoding.pop("offset_mapping")[0]  # [N, 2]
    device = next(model.parameters()).device
    model_was_training = model.training
    model.eval()
    outputs = model(input_ids=encoding["input_ids"].to(device), attention_mask=encoding["attention_mask"].to(device),
                    output_attentions=True, return_dict=True)
    model.train(model_was_training)

    patch_size, section_size = config.patch_size, config.section_size
    token_mask = encoding["attention_mask"][0].bool().view(-1, patch_size)  # [n_patches, P]
    patch_mask = token_mask.any(-1)  # [n_patches]
    section_mask = patch_mask.view(-1, section_size).any(-1)  # [n_sections]

    if outputs.section_attentions:
        sections = outputs.section_attentions[-1][0].float().mean(0)[0, 1:].cpu()  # document slot's row
    else:
        sections = torch.ones(section_mask.shape)
    sections = _normalised(sections, section_mask)  # [n_sections]
    if outputs.patch_attentions:
        patches = outputs.patch_attentions[-1][0].float().mean(1)[:, 0, 1:].cpu()  # [n_sections, Q]
    else:
        patches = torch.ones(section_mask.shape[0], section_size)
    patches = _normalised(patches, patch_mask.view(-1, section_size))
    if outputs.patch_pooling_weights:
        tokens = outputs.patch_pooling_weights[-1][0].float().cpu()  # [n_patches, P]
    else:
        tokens = outputs.token_attentions[-1][0].float().mean(1)[:, 0, 1 : 1 + patch_size].cpu()
    tokens = _normalised(tokens, token_mask)
    importance = sections[:, None, None] * patches[:, :, None] * tokens.view(-1, section_size, patch_size)
    importance = importance.reshape(-1)  # [N]

    has_text = offsets[:, 1] > offsets[:, 0]
    importance = _normalised(importance, has_text)
    starts = offsets[has_text, 0].tolist()
    weights = importance[has_text].tolist()
    sentence_bounds = [start for start, _ in sentence_starts(text)]
    word_bounds = sorted({0, *(match.start() for match in WORD.finditer(text))})

    probabilities = torch.softmax(outputs.logits[0].float(), -1).cpu()
    label_id = int(probabilities.argmax())
    id2label = getattr(config, "id2label", None) or {}
    name = lambda index: str(id2label.get(index, id2label.get(str(index), f"LABEL_{index}")))  # noqa: E731
    patch_texts = []
    for section in range(section_mask.shape[0]):
        row = []
        for patch in range(section * section_size, (section + 1) * section_size):
            spans = offsets[patch * patch_size : (patch + 1) * patch_size]
            spans = spans[spans[:, 1] > spans[:, 0]]
            row.append(text[int(spans[0, 0]) : int(spans[-1, 1])] if len(spans) else "")
        patch_texts.append(row)
    return Explanation(
        text=text,
        label=name(label_id),
        label_id=label_id,
        probabilities={name(index): float(p) for index, p in enumerate(probabilities)},
        sentences=_spans(text, sentence_bounds, starts, weights),
        words=_spans(text, word_bounds, starts, weights),
        section_weights=sections[section_mask].tolist(),
        patch_weights=[patches[s][patch_mask.view(-1, section_size)[s]].tolist() for s in range(len(sections))
                       if section_mask[s]],
        patch_texts=[row for row, valid in zip(patch_texts, section_mask.tolist()) if valid],
    )


def _highlight(text: str, spans: list[Span], color: str) -> str:
    top = max((span.weight for span in spans), default=0.0) or 1.0
    return "".join(
        f'<span class="u" style="background: rgba({color}, {span.weight / top:.3f})" '
        f'title="{span.weight:.4f}">{html.escape(text[span.start:span.end])}</span>'
        for span in spans
    )


def explanation_html(explanation: Explanation) -> str:
    """A self-contained HTML page: the predicted label, then the text twice, sentences and words highlighted by
    importance (the strongest at full colour; hover for the value). All user text is HTML-escaped."""
    probabilities = "".join(f"<li>{html.escape(label)}: {p:.3f}</li>" for label, p in
                            sorted(explanation.probabilities.items(), key=lambda item: -item[1])[:5])
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Explanation: {html.escape(explanation.label)}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto;line-height:1.5}}
.doc{{white-space:pre-wrap;border:1px solid #ccc;padding:1em}} .u{{border-radius:3px}}</style></head>
<body><h1>Predicted label: {html.escape(explanation.label)}</h1>
<ul>{probabilities}</ul>
<p>Importance: {html.escape(explanation.method)}.</p>
<h2>Sentences</h2><div class="doc">{_highlight(explanation.text, explanation.sentences, "255, 165, 0")}</div>
<h2>Words</h2><div class="doc">{_highlight(explanation.text, explanation.words, "65, 105, 225")}</div>
</body></html>
"""


def plot_attention(explanation: Explanation, path) -> None:
    """A PNG: the document's attention over its sections (bars) and each section's attention over its patches
    (a heat map, one row per section, labelled with the start of each patch's text)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_sections = len(explanation.section_weights)
    width = max(len(row) for row in explanation.patch_weights)
    grid = torch.full((n_sections, width), float("nan"))
    for row, weights in enumerate(explanation.patch_weights):
        grid[row, : len(weights)] = torch.tensor(weights)
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 1.2 + 0.5 * n_sections),
                                         gridspec_kw={"width_ratios": [1, 3]})
    left.barh(range(n_sections), explanation.section_weights, color="darkorange")
    left.set_yticks(range(n_sections), [f"section {i}" for i in range(n_sections)])
    left.invert_yaxis()
    left.set_xlabel("document -> section attention")
    image = right.imshow(grid.numpy(), aspect="auto", cmap="Blues", vmin=0)
    right.set_yticks(range(n_sections), [f"section {i}" for i in range(n_sections)])
    right.set_xlabel("patch in section (section -> patch attention)")
    for row, texts in enumerate(explanation.patch_texts):
        for column, snippet in enumerate(texts[:width]):
            if snippet:
                right.text(column, row, snippet[:14], ha="center", va="center", fontsize=6)
    figure.colorbar(image, ax=right)
    figure.suptitle(f"predicted: {explanation.label} ({explanation.probabilities[explanation.label]:.2f})")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


__all__ = ["Explanation", "Span", "explain", "explanation_html", "plot_attention"]
