"""CuPy gather/scatter kernels and cuBLAS GEMMs over kept rows."""
