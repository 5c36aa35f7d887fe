"""Triton kernels for pcDEQ solves, one module per op family (``dense.py``: ``z @ W.T`` layers;
``conv.py``: 3x3 convolutions), with what they share: ``epilogue.py`` (the @triton.jit device helpers:
the maps' epilogues, by id from the map table, and the stopping rule), ``launch.py`` (what the launchers
share: the iteration read from a ``SolveSpec``, input checks, autotuning, buffers, the stepwise host
loop), ``limits.py`` (what the kernels can take, readable without Triton) and ``aot.py`` (compiling for
sm_80/sm_90 without a GPU).

Importing this package imports nothing; its modules import Triton, and the backend
(``pcdeq_kernels.backends.triton``) imports them lazily, on the first solve, so that ``import
pcdeq_kernels`` stays cheap. Whether the kernels run on a GPU or in Triton's CPU interpreter is decided
when ``launch`` is first imported, from ``TRITON_INTERPRET``.
"""
