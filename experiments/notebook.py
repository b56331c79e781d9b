"""The shared first cell of the notebooks: offline, quiet, reproducible.

>>> from vlsafe.experiments.notebook import setup
>>> setup(seed=0, out=Path("runs/nb01"))   # before anything imports transformers
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path


def setup(seed: int, out: Path | None = None, precision: int = 4) -> None:
    """Offline hub (`HF_HUB_OFFLINE`), plain-text progress bars, transformers' logging silenced, readable pandas
    tables (`precision` digits), `torch.manual_seed(seed)`, and `out` created (when given)."""
    warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets: plain-text bars
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network: hub ids resolve from the local HF cache only
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import pandas as pd
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    pd.set_option("display.precision", precision)
    pd.set_option("display.width", 120)
    torch.manual_seed(seed)
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
