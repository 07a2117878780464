"""The functional API: drop-ins for their ``torch.nn.functional`` namesakes."""

from .ops.layer_norm import layer_norm

__all__ = ["layer_norm"]
