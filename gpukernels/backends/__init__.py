"""Kernel implementations, one package per backend (see gpukernels._backend)."""
