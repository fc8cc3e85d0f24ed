"""rnndsl: recurrent cells written as equations, compiled to fused kernels."""
from .compiler import analyse, builtin_specs, compile
from .errors import SourcePos, SpecError
from .layers import Network
from .runtime import Cell, Forward, Grads
from .seq2seq import Seq2Seq

__version__ = "0.1.0"
__all__ = ["compile", "analyse", "builtin_specs", "Cell", "Forward", "Grads", "Network",
           "Seq2Seq", "SpecError", "SourcePos", "__version__"]
