"""What the benchmarks under tools/ share: the machine and the versions a table was measured on."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any


def machine(**versions: str) -> dict[str, Any]:
    """CPU model, cores, memory, date, Python, the load average at the start, plus the given versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem = 0.0
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem, "date": time.strftime("%Y-%m-%d %H:%M"),
            "python": platform.python_version(), **versions, "load_average_at_start": os.getloadavg()}


def write_results(out: Path, stem: str, res: dict[str, Any], rows: list[dict[str, Any]], text: str) -> None:
    """OUT/<stem>.md (the table) and OUT/<stem>.json (settings, machine, every figure); prints the table."""
    import json

    res["rows"] = rows
    (out / f"{stem}.md").write_text(text)
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1, default=str))
    print(text)
    print(f"wrote {out / f'{stem}.md'}, {out / f'{stem}.json'}")


def lm_machine() -> dict[str, Any]:
    """machine() with the LM benchmarks' versions and a hash of the measured code: the top-k targets
    and their reconstruction (ensemblekd/topk.py) and the shard codec (ensemblekd/tasks/token.py)."""
    import hashlib

    import numpy as np
    import pyarrow as pa
    import torch
    import transformers

    import ensemblekd.tasks.token
    import ensemblekd.topk

    code = b"".join(Path(m.__file__).read_bytes() for m in (ensemblekd.topk, ensemblekd.tasks.token))
    return {**machine(torch=torch.__version__, transformers=transformers.__version__, pyarrow=pa.__version__,
                      numpy=np.__version__), "topk_codec_sha256": hashlib.sha256(code).hexdigest()[:16]}
