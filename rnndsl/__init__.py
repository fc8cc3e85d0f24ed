"""rnndsl: recurrent cells written as equations, compiled to fused kernels."""
import os

# OpenBLAS's idle threads spin for about 2^28 cycles after each call; the CPU time loops run
# on the same cores right after a GEMM (backend/row_threads.py), and a spinning BLAS thread
# took the second core from them (LSTM forward at T=100, B=16, H=128: 4.0 ms, 2.8 ms with
# this). 2^4 cycles makes them sleep at once. Set before the kernels' BLAS (SciPy's OpenBLAS,
# loaded on the first product) reads it; a value the user set wins.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from rnndsl.compiler import analyse, builtin_specs, builtin_tree_specs, compile
from rnndsl.language.errors import SourcePos, SpecError
from rnndsl.training.layers import Network
from rnndsl.engines.cell import Cell, Forward, Grads
from rnndsl.engines.tree import TreeBatch, TreeCell
from rnndsl.backend.onnx_export import export_onnx
from rnndsl.training.seq2seq import Seq2Seq

__version__ = "0.1.0"
__all__ = ["compile", "analyse", "builtin_specs", "builtin_tree_specs", "Cell", "Forward", "Grads",
           "Network", "TreeBatch", "TreeCell", "Seq2Seq", "export_onnx", "SpecError", "SourcePos",
           "__version__"]
