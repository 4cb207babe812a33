"""Profiling (parameters, MACs, memory) and trtexec-style benchmarks."""
