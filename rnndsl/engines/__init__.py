"""Running compiled cells: the Cell API and its engines (generated kernels, CUDA, the NumPy reference), and finite-difference checks."""
