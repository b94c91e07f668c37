"""How evaluation names what it logs, for code that reads the names back (``cir compare``, the
metrics table, eval artifacts) without importing torch.

A metric key is ``{split}/[{dataset}/]{name}``. Reference lines (``text_blind/``, ``chance/``, …) and
multi-turn sessions (``turn_{t}/``, ``core.session_eval``) sit where a dataset name would, so a
reader must not take them for one: ``DATASET_PATTERN`` matches a dataset segment and nothing else.
"""

from __future__ import annotations

# Metric-name prefixes of the reference lines: never dataset names in a ``{split}/{name}/...`` key.
REFERENCE_LINES = ("text_blind", "chance", "view_incomplete", "subset")
REFERENCE_PATTERN = "|".join(REFERENCE_LINES)
TURN_PATTERN = r"turn_\d+"
DATASET_PATTERN = rf"(?!(?:{REFERENCE_PATTERN}|{TURN_PATTERN})/)[\w\-]+"
