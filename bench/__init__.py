"""gpukernels' benchmarks, outside the installed package.

    python -m bench [--quick] [--ops ...]      every op against its baselines (bench/__main__.py)
    python -m bench.accuracy                   largest error of every op against PyTorch, per dtype
    python -m bench.host_overhead              host time of the pieces of a call (needs a CUDA GPU)
    python -m bench.host_time --out DIR        host instructions per call under callgrind (no GPU)

``harness`` times, ``report`` writes the results, ``cases/<op>.py`` holds each op's
shapes, inputs, byte counts and the providers it is compared with.
"""
