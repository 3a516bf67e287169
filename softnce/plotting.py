"""The one way softnce gets matplotlib: the file-only ``Agg`` backend, imported on first use."""

from __future__ import annotations

from softnce import _extras

if _extras.MISSING_TRAIN:
    raise _extras.missing_extra("train", __name__)

def pyplot():
    """``matplotlib.pyplot`` on the ``Agg`` backend (PNG files, no screen needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
