"""Benchmarks of sau against diffusers/transformers on the same weights, in the same process.

    python -m benchmarks                 # the CPU table (SD1.5 size, random weights), see --help
    python -m benchmarks.gpu             # the GPU table, SAU run and sampling throughput on CUDA

harness.py measures (interleaved medians, peak memory); cases.py builds the models and says what each row
runs; __main__.py and gpu.py are the two command lines.
"""
