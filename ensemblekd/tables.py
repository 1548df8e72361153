"""Plain-text and markdown tables, and human-readable sizes (no heavy imports: the CLI uses them)."""

from __future__ import annotations

from collections.abc import Sequence


def text_table(header: Sequence[str], lines: Sequence[Sequence[str]], left: int = 1) -> str:
    """Columns padded to width; the first `left` columns left-aligned, the rest right-aligned."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" if i < left else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*map(str, l)) for l in lines])


def markdown_table(header: Sequence[str], lines: Sequence[Sequence[str]], left: int = 1) -> str:
    align = ["---" if i < left else "---:" for i in range(len(header))]
    return "\n".join("| " + " | ".join(map(str, row)) + " |" for row in [header, align, *lines])


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
