"""asv benchmarks of npsparseattn, one module per operation (see ../README.md)."""
