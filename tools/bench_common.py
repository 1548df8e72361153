"""What the LM benchmarks under tools/ share: the machine, their versions and the measured code.

Internals measured directly:
  ensemblekd.topk: hashed, not run: the top-k code whose figures the LM tables give
  ensemblekd.tasks.token.codec: hashed, not run: the shard codec whose figures the LM tables give
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def lm_machine() -> dict[str, Any]:
    """testing.machine() with the LM benchmarks' versions and a hash of the measured code: the top-k
    targets and their reconstruction (ensemblekd/topk.py) and the shard codec (ensemblekd/tasks/token/codec.py)."""
    import hashlib

    import numpy as np
    import pyarrow as pa
    import torch
    import transformers

    import ensemblekd.tasks.token.codec
    import ensemblekd.topk
    from ensemblekd.testing import machine

    code = b"".join(Path(m.__file__).read_bytes() for m in (ensemblekd.topk, ensemblekd.tasks.token.codec))
    return {**machine(torch=torch.__version__, transformers=transformers.__version__, pyarrow=pa.__version__,
                      numpy=np.__version__), "topk_codec_sha256": hashlib.sha256(code).hexdigest()[:16]}
