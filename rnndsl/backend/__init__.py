"""The back ends: the kernel plan (schedule), the CPU and CUDA emitters and their kernel library, and what generated modules import (BLAS, scratch, CUDA support, the module cache)."""
