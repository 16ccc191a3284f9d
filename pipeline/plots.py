"""PNG figures people look at: training curves, CMC curves, retrieval examples.

Saved with matplotlib's Agg backend and without timestamps, so equal inputs give equal bytes.
"""

from __future__ import annotations

import io
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.core.io import writing_file  # noqa: E402

_PNG_METADATA = {"Software": None}


def save_figure(figure, path: str | Path, dpi: int = 100) -> None:
    try:
        with writing_file(path) as tmp:
            figure.savefig(tmp, format="png", dpi=dpi, metadata=_PNG_METADATA)
    finally:
        plt.close(figure)


def plot_training_curves(losses: list, epochs: list, path: str | Path, title: str) -> None:
    """Per-step loss (with a running mean) and per-epoch validation R1 and mAP."""
    figure, (loss_axis, val_axis) = plt.subplots(1, 2, figsize=(10, 3.6))
    if losses:
        steps, values = zip(*losses)
        loss_axis.plot(steps, values, lw=0.6, alpha=0.5, label="step")
        window = max(1, len(values) // 20)
        smooth = torch.tensor(values).unfold(0, window, 1).mean(1).tolist() if len(values) >= window else []
        loss_axis.plot(steps[window - 1 :], smooth, lw=1.5, label=f"mean of {window}")
        loss_axis.legend()
    loss_axis.set(xlabel="step", ylabel="loss", title="training loss")
    if epochs:
        numbers = [e["epoch"] for e in epochs]
        val_axis.plot(numbers, [e["val_R1"] for e in epochs], marker="o", label="val R1")
        val_axis.plot(numbers, [e["val_mAP"] for e in epochs], marker="s", label="val mAP")
        val_axis.legend()
    val_axis.set(xlabel="epoch", ylabel="%", title="validation")
    figure.suptitle(title)
    figure.tight_layout()
    save_figure(figure, path)


def plot_cmc(cmc: list[float], path: str | Path, title: str) -> None:
    figure, axis = plt.subplots(figsize=(5, 3.6))
    ranks = range(1, len(cmc) + 1)
    axis.plot(ranks, cmc, marker=".")
    axis.set(xlabel="rank", ylabel="matching rate (%)", title=title, ylim=(0, 100.5))
    axis.grid(alpha=0.3)
    figure.tight_layout()
    save_figure(figure, path)


def plot_retrievals(
    queries: list[str],
    ranked_images: list[list[bytes]],
    ranked_correct: list[list[bool]],
    path: str | Path,
    title: str,
) -> None:
    """One row per query: its text, then its top-K gallery images, correct ones framed green (grey where
    correctness is unknown: None)."""
    rows, top_k = len(queries), max(len(r) for r in ranked_images)
    figure, axes = plt.subplots(rows, top_k + 1, figsize=(1.1 * top_k + 3.2, 2.2 * rows), squeeze=False,
                                gridspec_kw={"width_ratios": [3] + [1] * top_k})
    for row, (query, images, correct) in enumerate(zip(queries, ranked_images, ranked_correct)):
        text_axis = axes[row][0]
        text_axis.axis("off")
        text_axis.text(0, 0.5, "\n".join(textwrap.wrap(query, 38)), fontsize=7, va="center")
        for column in range(top_k):
            axis = axes[row][column + 1]
            axis.set_xticks([]), axis.set_yticks([])
            if column >= len(images):
                axis.axis("off")
                continue
            axis.imshow(Image.open(io.BytesIO(images[column])).convert("RGB"))
            colour = "tab:grey" if correct[column] is None else "tab:green" if correct[column] else "tab:red"
            for spine in axis.spines.values():
                spine.set_color(colour), spine.set_linewidth(3)
            if row == 0:
                axis.set_title(str(column + 1), fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    save_figure(figure, path)


def plot_generated_pairs(rows: list[dict], path: str | Path, title: str) -> None:
    """One row per sample: source image, generated image (and blend mask), both captions.

    Each row is a dict with `source`, `generated`, optional `mask` (PNG bytes) and
    `source_caption`, `edited_caption`, `change` (e.g. "red shirt -> green shirt").
    """
    columns = 3 if any(row.get("mask") for row in rows) else 2
    figure, axes = plt.subplots(len(rows), columns + 1, figsize=(1.3 * columns + 5.0, 2.1 * len(rows)),
                                squeeze=False, gridspec_kw={"width_ratios": [1] * columns + [4]})
    for axis_row, row in zip(axes, rows):
        pictures = [row["source"], row["generated"]] + ([row.get("mask")] if columns == 3 else [])
        for axis, name, picture in zip(axis_row, ("source", "generated", "mask"), pictures):
            axis.set_xticks([]), axis.set_yticks([])
            if picture:
                axis.imshow(Image.open(io.BytesIO(picture)).convert("RGB"))
            axis.set_title(name, fontsize=7)
        text_axis = axis_row[-1]
        text_axis.axis("off")
        text = (f"{row['change']}\n\nsource: " + "\n".join(textwrap.wrap(row["source_caption"], 60))
                + "\nedited: " + "\n".join(textwrap.wrap(row["edited_caption"], 60)))
        text_axis.text(0, 0.5, text, fontsize=6.5, va="center")
    figure.suptitle(title)
    figure.tight_layout()
    save_figure(figure, path)


def plot_filter_examples(pairs: list, sources: dict[str, bytes], path: str | Path, per_group: int) -> None:
    """Two blocks of rows, kept then rejected pairs (evenly spread, not cherry-picked): source and
    generated image, the change, the scores and, for rejected ones, the failed criteria."""
    kept = [p for p in pairs if p.kept]
    rejected = [p for p in pairs if not p.kept]
    rows = [(p, "kept") for p in _spread(kept, per_group)] + [(p, "rejected") for p in _spread(rejected, per_group)]
    if not rows:
        return
    figure, axes = plt.subplots(len(rows), 3, figsize=(7.5, 1.9 * len(rows)), squeeze=False,
                                gridspec_kw={"width_ratios": [1, 1, 5]})
    for (pair, verdict), axis_row in zip(rows, axes):
        for axis, picture, name in zip(axis_row, (sources[pair.record["source_key"]], pair.members["png"]),
                                       ("source", "generated")):
            axis.imshow(Image.open(io.BytesIO(picture)).convert("RGB"))
            axis.set_xticks([]), axis.set_yticks([])
            axis.set_title(name, fontsize=7)
        s = pair.scores
        change = "; ".join(f"{c['phrase_before']} -> {c['phrase_after']}" for c in pair.record["changes"])
        lines = [f"{verdict.upper()}" + (f" ({', '.join(pair.reasons)})" if pair.reasons else ""), change,
                 f"sim edited {s['edited_similarity']:.3f}  source {s['source_similarity']:.3f}  margin {s['margin']:+.3f}",
                 f"outside change {s['outside_change']:.1f}  std {s['pixel_std']:.1f}  noise {s['noise_share']:.2f}"]
        axis_row[2].axis("off")
        axis_row[2].text(0, 0.5, "\n".join(lines), fontsize=6.5, va="center",
                         color="darkgreen" if verdict == "kept" else "darkred")
    figure.suptitle("filter: kept and rejected proximity pairs")
    figure.tight_layout()
    save_figure(figure, path)


def _spread(items: list, count: int) -> list:
    if len(items) <= count:
        return items
    return [items[i] for i in torch.linspace(0, len(items) - 1, count).long().tolist()]
