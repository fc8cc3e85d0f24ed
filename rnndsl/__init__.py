"""rnndsl: recurrent cells written as equations, compiled to fused kernels."""
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
