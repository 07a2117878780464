"""The ops ``python -m bench`` times, in the order of its reports: one module per op with
its shapes (``SHAPES``; ``QUICK_SHAPES`` for ``--quick``; ``CPU_SHAPES`` without a GPU) and
``case(shape, device, dtype)``, the ``bench.harness.Case`` of one shape; an op with
performance targets also has ``TARGET_SHAPES`` and ``TARGETS`` (for ``--targets``)."""

from . import (
    adamw,
    add_rms_norm,
    amp_adamw,
    batch_norm,
    batch_norm_add_relu,
    batch_norm_relu,
    clip_adamw,
    cross_entropy,
    cross_entropy_amp,
    dropout,
    gated_act,
    layer_norm,
    linear_act,
    linear_cross_entropy,
    rms_norm_add,
    rope,
)

OPS = {
    module.__name__.rpartition(".")[2]: module
    for module in (
        layer_norm,
        add_rms_norm,
        rms_norm_add,
        cross_entropy,
        cross_entropy_amp,
        dropout,
        batch_norm,
        batch_norm_relu,
        batch_norm_add_relu,
        rope,
        gated_act,
        linear_act,
        linear_cross_entropy,
        adamw,
        clip_adamw,
        amp_adamw,
    )
}
