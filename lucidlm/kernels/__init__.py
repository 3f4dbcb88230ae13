"""Compute kernels of our own, in C++, built on first use (`cpu_decode`: integer-dot matmuls and
one-query attention for decode steps on CPUs with AVX-512 VNNI)."""
