"""How raw item and category ids become embedding rows, on the host: shared by training, the
ranking model and serving. No torch here, so the serving path does not import it.
"""

from __future__ import annotations

import numpy as np

PAD = 0  # history padding
OOV = 1  # an id outside the model's vocabulary
FIRST_ID = 2  # id i is row i + FIRST_ID


def map_item_ids(ids: np.ndarray, vocabulary: int) -> np.ndarray:
    """Raw ids to embedding rows: pad (-1) → 0, unknown → 1, id → id + 2. Never out of range."""
    known = (ids >= 0) & (ids < vocabulary)
    mapped = np.where(known, ids + FIRST_ID, OOV)
    return np.where(ids == -1, PAD, mapped).astype(np.int64)
