"""Triton kernels for pcDEQ solves, one module per op family (``dense.py``: ``z @ W.T`` layers).

Importing this package imports Triton; the backend (``pcdeq_kernels.backends.triton``) does so lazily,
on the first solve, so that ``import pcdeq_kernels`` stays cheap. Whether the kernels run on a GPU or
in Triton's CPU interpreter is decided when ``dense`` is first imported, from ``TRITON_INTERPRET``.
"""
