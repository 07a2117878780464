"""Reference kernels in NumPy: every op, forward and backward, on CPU tensors.

Floating inputs are computed in float64 when they are float64 and in float32
otherwise (bf16/fp16 are widened on the way in and rounded on the way out).
"""


def device_types() -> tuple[str, ...]:
    return ("cpu",)


def unavailable_reason() -> str | None:
    return None
