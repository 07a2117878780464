"""The functional API: drop-ins for their ``torch.nn.functional`` namesakes
(``linear_act`` and the seeded ``dropout`` follow their own definitions where PyTorch has
no counterpart; ``apply_rotary_pos_emb`` is transformers'; ``add_layer_norm`` and
``add_rms_norm`` return a residual addition's sum beside its norm; ``layer_norm_add`` and
``rms_norm_add`` add a norm's result to a residual)."""

from .ops.add_norm import add_layer_norm, add_rms_norm
from .ops.batch_norm import batch_norm
from .ops.cross_entropy import cross_entropy
from .ops.dropout import dropout
from .ops.gated_act import geglu, swiglu
from .ops.layer_norm import layer_norm
from .ops.linear_act import linear_act
from .ops.linear_cross_entropy import linear_cross_entropy
from .ops.norm_add import layer_norm_add, rms_norm_add
from .ops.rms_norm import rms_norm
from .ops.rope import apply_rotary_pos_emb

__all__ = [
    "add_layer_norm",
    "add_rms_norm",
    "apply_rotary_pos_emb",
    "batch_norm",
    "cross_entropy",
    "dropout",
    "geglu",
    "layer_norm",
    "layer_norm_add",
    "linear_act",
    "linear_cross_entropy",
    "rms_norm",
    "rms_norm_add",
    "swiglu",
]
