"""The step history (``GET .../steps``) as records, and as CSV without pandas."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from typing import Any

from optserve_client import _documents

METRICS = ("grad_norm", "update_norm", "param_norm", "loss")
"""The metrics columns of :func:`to_csv`, in order (empty where a step has none)."""


def page(response: Any) -> tuple[list[dict[str, Any]], int | None]:
    """One page's records and the cursor of the next (None on the last page)."""
    document = _documents.json_body(response)
    records: list[dict[str, Any]] = document["steps"]
    after = document.get("next")
    return records, (int(after) if after is not None else None)


def to_csv(records: Sequence[dict[str, Any]]) -> str:
    """``seq, step, time, applied, skipped, lr0.., grad_norm, update_norm, param_norm, loss``.

    One ``lr<i>`` column per param group (as many as the widest record has)."""
    groups = max((len(r.get("lr", [])) for r in records), default=0)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    header = ["seq", "step", "time", "applied", "skipped"]
    writer.writerow(header + [f"lr{i}" for i in range(groups)] + list(METRICS))
    for r in records:
        lr = list(r.get("lr", []))
        metrics = r.get("metrics") or {}
        applied = str(bool(r["applied"])).lower()
        writer.writerow(
            [r["seq"], r["step"], r["time"], applied, r.get("skipped") or ""]
            + [repr(float(x)) for x in lr]
            + [""] * (groups - len(lr))
            + [repr(float(metrics[m])) if m in metrics else "" for m in METRICS]
        )
    return out.getvalue()
