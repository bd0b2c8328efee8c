"""The batch format: the one contract between the data pipeline, the trainer, the loss and the tools.

Every example has the fixed length T; one 1-D array per column (docs/method.md §3):

========================  =======  ====================================================================
column                    dtype    meaning
========================  =======  ====================================================================
``input_ids``             int32    token id; the mask id at masked draft positions; the pad id padding
``position_ids``          int32    clean: 0 … L−1; draft at cursor c: c+1, c+2, …; padding: 0
``span_id``               int32    ``CLEAN`` (−1) clean, s ≥ 0 draft span s, ``PAD`` (−2) padding
``anchor``                int32    clean: own position; draft: the span's cursor c; padding: −1
``labels``                int32    target, ALREADY SHIFTED (clean p → x_{p+1}; draft at c+j → x_{c+j+1});
                                   ``IGNORE`` (−100) for none
``k``                     int8     prediction distance: 1 clean AR target, j+1 for the draft at c+j; 0 none
``weight`` (bidir. only)  float32  loss weight 1/t at masked positions, 0 elsewhere
========================  =======  ====================================================================

No torch, no Ray: NumPy dtypes only, so every stage can import it.
"""

from __future__ import annotations

import numpy as np

COLUMNS: tuple[str, ...] = ("input_ids", "position_ids", "span_id", "anchor", "labels", "k")
BIDIRECTIONAL_COLUMNS: tuple[str, ...] = (*COLUMNS, "weight")
DTYPES: dict[str, np.dtype] = {
    "input_ids": np.dtype(np.int32),
    "position_ids": np.dtype(np.int32),
    "span_id": np.dtype(np.int32),
    "anchor": np.dtype(np.int32),
    "labels": np.dtype(np.int32),
    "k": np.dtype(np.int8),
    "weight": np.dtype(np.float32),
}

IGNORE = -100  # label of a position without a target (PyTorch's cross-entropy ignore_index)
CLEAN = -1  # span_id of the clean stream
PAD = -2  # span_id of padding


def columns_for(mode: str) -> tuple[str, ...]:
    """The columns a training batch carries in noise mode `mode` ("causal" or "bidirectional")."""
    return BIDIRECTIONAL_COLUMNS if mode == "bidirectional" else COLUMNS
