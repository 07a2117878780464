"""Thin entry point: `python bench/run.py [--quick] [--ops ...]` runs gpukernels.bench."""

from gpukernels.bench import main

if __name__ == "__main__":
    main()
