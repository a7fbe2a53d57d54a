"""Result tables: the terminal table and the Markdown report."""
from __future__ import annotations

from typing import Dict, List, Sequence

OPS_COLUMNS = [
    ("case", "case", "{}"), ("provider", "provider", "{}"), ("ms", "median ms", "{:.4f}"),
    ("ms_p20", "p20", "{:.4f}"), ("ms_p80", "p80", "{:.4f}"), ("gbps", "GB/s", "{:.0f}"),
    ("frac_copy_bw", "of copy BW", "{:.0%}"), ("speedup_vs_eager", "vs eager", "{:.2f}x"),
]


def _cells(rows: Sequence[dict], columns) -> List[List[str]]:
    return [[fmt.format(r[key]) for key, _, fmt in columns] for r in rows]


def text_table(rows: Sequence[dict], columns=OPS_COLUMNS) -> str:
    head = [title for _, title, _ in columns]
    body = _cells(rows, columns)
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])


def markdown_table(rows: Sequence[dict], columns=OPS_COLUMNS) -> str:
    head = [title for _, title, _ in columns]
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(cells) + " |" for cells in _cells(rows, columns)]
    return "\n".join(out)


def markdown_report(env: Dict[str, object], command: str, date: str, copy_gbps: float, rows: Sequence[dict]) -> str:
    lines = [
        "# fastres benchmark",
        "",
        f"- date: {date}",
        f"- command: `{command}`",
        f"- device: {env['device']} ({env['device_type']})",
        f"- torch {env['torch']}, CUDA {env['cuda']}, triton {env['triton']}, "
        f"fastres {env['fastres']} ({env['fastres_commit']}), CUDA kernels: {env['cuda_kernels']}",
        f"- measured copy bandwidth: {copy_gbps:.0f} GB/s (bytes read + written)",
        "",
        "## Elementwise fusions",
        "",
        "Times are medians with p20/p80 over repeated runs. GB/s counts the least traffic the op",
        "needs (each input read once, the output written once); `of copy BW` compares it with the",
        "copy bandwidth above; `vs eager` is the speedup over the stock PyTorch sequence.",
        "",
        markdown_table(rows),
        "",
    ]
    return "\n".join(lines)
