#!/usr/bin/env python3
"""Write csrc/include/pcdeq/map_ids.h from the map table (pcdeq_kernels/activations.py).

Run after adding an activation; tests/test_activations.py fails while the header is stale."""

from pathlib import Path

from pcdeq_kernels.activations import c_header

HEADER = Path(__file__).resolve().parents[1] / "csrc" / "include" / "pcdeq" / "map_ids.h"

if __name__ == "__main__":
    HEADER.write_text(c_header())
    print(f"wrote {HEADER}")
