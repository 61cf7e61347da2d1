"""``ccld-trt bench compare A.json B.json``: two benchmark runs side by side, as a Markdown table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ccld_trt.benchmarks.machine import machine_slug
from ccld_trt.benchmarks.report import KEY_FIELDS, STAGES, load_results

Key = tuple[Any, ...]


def _key(record: dict[str, Any]) -> Key:
    return tuple(record.get(k) for k in KEY_FIELDS)


def _sort_key(key: Key) -> tuple[Any, ...]:
    backend, precision, stage, batch, steps, n = key
    return (backend, precision, STAGES.index(stage) if stage in STAGES else len(STAGES), batch, steps or 0, n or 0)


def _ms(record: dict[str, Any] | None) -> str:
    return "—" if record is None else f"{record['median_ms']:,.2f}"


def compare_docs(a: dict[str, Any], b: dict[str, Any], a_name: str = "A", b_name: str = "B") -> str:
    """Markdown table of the records of two result documents matched on (backend, precision, stage, batch,
    steps, n): both medians and B's speedup over A (A's median / B's; > 1 means B is faster). Records found in
    only one run are listed with a dash on the other side."""
    a_records = {_key(r): r for r in a["results"]}
    b_records = {_key(r): r for r in b["results"]}
    lines = [
        "# Benchmark comparison: B / A speedup", "",
        f"- A: {a_name} — {machine_slug(a['machine'])}, {a['machine']['date']}",
        f"- B: {b_name} — {machine_slug(b['machine'])}, {b['machine']['date']}",
        "- speedup = A median / B median (> 1: B is faster)", "",
        "| backend | precision | stage | batch | steps | n | A median ms | B median ms | speedup |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key in sorted(a_records.keys() | b_records.keys(), key=_sort_key):
        ra, rb = a_records.get(key), b_records.get(key)
        speedup = (f"{ra['median_ms'] / rb['median_ms']:.2f}×"
                   if ra is not None and rb is not None and rb["median_ms"] > 0 else "—")
        backend, precision, stage, batch, steps, n = key
        lines.append(f"| {backend} | {precision} | {stage} | {batch} | {steps or '—'} | {n or '—'} | {_ms(ra)} | "
                     f"{_ms(rb)} | {speedup} |")
    return "\n".join(lines) + "\n"


def compare(a_json: Path | str, b_json: Path | str) -> str:
    """``compare_docs`` of two results files (UserError when one is unreadable or of another schema)."""
    return compare_docs(load_results(a_json), load_results(b_json), Path(a_json).name, Path(b_json).name)
