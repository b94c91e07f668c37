"""Numbers the papers report, for ``cir compare --reported``: our runs beside the published rows.

FashionMV paper, Table 2: R@5 and R@10 (%) per dataset on FashionMV's validation split, keyed by
the dataset names of the converted FashionMV release (``deepfashion``, ``f200k``, ``fashiongen_val``).
Doubao-Embedding-Vision is closed and has no parameter count.
"""

from __future__ import annotations

TABLE2_DATASETS = ("deepfashion", "f200k", "fashiongen_val")

# (model, parameters, strategy, R@5/R@10 per dataset in TABLE2_DATASETS' order)
TABLE2: list[tuple[str, str, str, tuple[float, ...]]] = [
    ("CLIP4CIR", "0.25B", "meanpool", (28.0, 39.3, 13.3, 19.3, 16.2, 23.6)),
    ("CLIP4CIR", "0.25B", "maxsim", (25.7, 36.6, 11.9, 17.7, 17.1, 25.0)),
    ("SPRC", "1.2B", "meanpool", (53.4, 65.1, 32.9, 42.3, 38.5, 48.7)),
    ("SPRC", "1.2B", "maxsim", (55.8, 67.7, 34.4, 43.7, 42.7, 53.0)),
    ("Qwen3-VL-Embedding-2B", "2B", "joint", (75.7, 86.4, 61.1, 72.3, 63.0, 74.1)),
    ("Qwen3-VL-Embedding-2B", "2B", "meanpool", (76.8, 87.5, 60.3, 72.0, 56.3, 68.3)),
    ("Qwen3-VL-Embedding-2B", "2B", "maxsim", (73.9, 85.4, 57.3, 70.3, 58.2, 69.9)),
    ("RzenEmbed", "8B", "joint", (24.3, 32.0, 12.7, 17.0, 18.9, 25.6)),
    ("RzenEmbed", "8B", "meanpool", (47.5, 58.0, 28.0, 36.5, 32.5, 42.2)),
    ("RzenEmbed", "8B", "maxsim", (29.6, 38.8, 16.0, 21.8, 22.1, 28.8)),
    ("Qwen3-VL-Embedding-8B", "8B", "joint", (87.4, 93.2, 73.8, 82.1, 74.7, 83.5)),
    ("Qwen3-VL-Embedding-8B", "8B", "meanpool", (85.3, 92.6, 68.1, 77.8, 67.9, 78.4)),
    ("Qwen3-VL-Embedding-8B", "8B", "maxsim", (85.6, 92.3, 68.8, 78.2, 70.4, 79.6)),
    ("Doubao-Embedding-Vision", "", "joint", (67.8, 84.0, 50.1, 64.0, 56.1, 70.4)),
    ("Doubao-Embedding-Vision", "", "meanpool", (82.4, 90.5, 61.2, 71.8, 61.4, 72.6)),
    ("Doubao-Embedding-Vision", "", "maxsim", (82.3, 90.8, 62.2, 72.6, 67.2, 77.1)),
    ("ProCIR", "0.8B", "joint", (89.2, 94.9, 77.6, 86.6, 75.0, 85.3)),
]


def table2_recalls(values: tuple[float, ...]) -> dict[str, float]:
    """One reported row as ``{"{dataset}/recall_at_{k}": fraction}``, the keys runs log under ``val/``."""
    return {f"{ds}/recall_at_{k}": values[2 * i + j] / 100
            for i, ds in enumerate(TABLE2_DATASETS) for j, k in enumerate((5, 10))}
