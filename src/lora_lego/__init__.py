"""lora-lego: merge LoRA adapters by rank-wise clustering (LoRA-LEGO) and the standard baselines."""

from __future__ import annotations

__version__ = "0.1.0"

import os as _os

# torch's OpenMP threads spin while they wait for work. On a machine whose cores are busy with other
# processes that spinning made a merge 15-35x slower than one thread (benchmarks/speed/RESULTS.md);
# waiting threads sleep instead unless the user set a policy. Takes effect only where torch is not
# imported yet (the CLI, or `import lora_lego` first).
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# numpy's BLAS (OpenBLAS) serves only lego's k-means, on P x P matrices of a few hundred: there a second
# BLAS thread costs more than it gives (k-means 2-5x slower at OMP_NUM_THREADS=2 with other work on the
# cores, benchmarks/speed/NOTES.md). torch's own threads are not affected.
_os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# Where this process is the `lora-lego merge` command running lego, a worker process starts computing the
# merge now, while torch is imported below (~1 s); see prefetch.py. Torch-free.
from . import prefetch as _prefetch  # noqa: E402

_prefetch.start_for_cli()

from .adapter import Adapter, Factors, ModuleSpec  # noqa: E402
from .errors import LoraLegoError  # noqa: E402
from .formats import convert, load_adapter  # noqa: E402
from .io import save_adapter  # noqa: E402
from .merge import merge, prune  # noqa: E402
from .integrations.peft import merge_peft_adapters  # noqa: E402
from .methods import METHODS  # noqa: E402

if _prefetch.ACTIVE is not None:
    _prefetch.ACTIVE.go()  # torch is imported: the waiting prefetch workers may start

__all__ = [
    "Adapter", "Factors", "ModuleSpec", "LoraLegoError", "METHODS",
    "load_adapter", "save_adapter", "convert", "merge", "prune", "merge_peft_adapters", "__version__",
]
