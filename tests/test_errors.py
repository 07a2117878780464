"""Bad input: every public op, module and optimizer raises gk.ArgumentError or
gk.ArgumentTypeError, which ``except RuntimeError`` (as around PyTorch's ops) and
``except ValueError`` / ``except TypeError`` (as around Python code) both catch,
with a message that names the argument; and for input PyTorch rejects, ours is
an instance of every one of those classes that PyTorch's error is."""

from __future__ import annotations

import re
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import gpukernels as gk
from gpukernels import distributed, errors


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def _labels(*shape, classes=3):
    return torch.randint(0, classes, shape)


def _step_with_sparse_grad():
    p = torch.nn.Parameter(_x(4))
    p.grad = torch.zeros(4).to_sparse()
    gk.optim.AdamW([p]).step()


def _fuse_non_linear_head():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    gk.fuse_linear_cross_entropy(model, "1", torch.nn.CrossEntropyLoss())


VALUE, TYPE = ValueError, TypeError
# (id, call, ValueError or TypeError: the class Python code catches it by, the argument its message names)
BAD_INPUTS = [
    # gk.functional
    ("batch_norm", lambda: gk.batch_norm(_x(4, 3), torch.zeros(2), torch.ones(2)), VALUE, "running_mean"),
    ("batch_norm_eps", lambda: gk.batch_norm(_x(4, 3), None, None, training=True, eps=-1.0), VALUE, "eps"),
    ("cross_entropy_target", lambda: gk.cross_entropy(_x(4, 3), _labels(5)), VALUE, "target"),
    ("cross_entropy_input", lambda: gk.cross_entropy(_labels(4, 3), _labels(4)), TYPE, "input"),
    ("cross_entropy_reduction", lambda: gk.cross_entropy(_x(4, 3), _labels(4), reduction="avg"), VALUE, "reduction"),
    ("dropout", lambda: gk.dropout(_x(8), p=1.5), VALUE, "p"),
    ("dropout_seed", lambda: gk.dropout(_x(8), seed=1.5), TYPE, "seed"),
    ("geglu", lambda: gk.geglu(_x(2, 4), _x(2, 4), approximate="erf"), VALUE, "approximate"),
    ("swiglu", lambda: gk.swiglu(_x(2, 4), _x(2, 4, dtype=torch.float64)), TYPE, "up"),
    ("layer_norm", lambda: gk.layer_norm(_x(2, 5), (4,)), VALUE, "normalized_shape"),
    ("linear_act", lambda: gk.linear_act(_x(2, 3), _x(4, 3), activation="tanh"), VALUE, "activation"),
    ("linear_act_dtype", lambda: gk.linear_act(_x(2, 3), _x(4, 3, dtype=torch.float64)), TYPE, "weight"),
    (
        "linear_cross_entropy",
        lambda: gk.linear_cross_entropy(_x(4, 5), _x(3, 5), _labels(4), chunk_size=0),
        VALUE,
        "chunk_size",
    ),
    ("rms_norm", lambda: gk.rms_norm(_x(2, 5), (5,), cast_before_weight="yes"), TYPE, "cast_before_weight"),
    # gk.nn
    ("LinearAct", lambda: gk.nn.LinearAct(3, 4, activation="tanh"), VALUE, "activation"),
    ("LayerNorm", lambda: gk.nn.LayerNorm(4)(_x(2, 5)), VALUE, "normalized_shape"),
    ("RMSNorm", lambda: gk.nn.RMSNorm(4)(_x(2, 5)), VALUE, "normalized_shape"),
    ("BatchNorm1d", lambda: gk.nn.BatchNorm1d(3)(_labels(4, 3)), TYPE, "input"),
    ("BatchNorm2d", lambda: gk.nn.BatchNorm2d(3)(_labels(2, 3, 2, 2)), TYPE, "input"),
    ("Dropout", lambda: gk.nn.Dropout(seed="seed")(_x(8)), TYPE, "seed"),
    ("CrossEntropyLoss", lambda: gk.nn.CrossEntropyLoss()(_x(4, 3), _labels(5)), VALUE, "target"),
    ("LinearCrossEntropyLoss", lambda: gk.nn.LinearCrossEntropyLoss(reduction="avg"), VALUE, "reduction"),
    (
        "FusedHeadLoss",
        lambda: gk.nn.FusedHeadLoss(torch.nn.Linear(5, 3), gk.nn.LinearCrossEntropyLoss())(_x(4, 5), _x(4)),
        TYPE,
        "target",
    ),
    ("SyncBatchNorm", lambda: distributed.SyncBatchNorm(3)(_x(3)), VALUE, "input"),
    ("sync_batch_norm", lambda: distributed.sync_batch_norm(_x(4, 3), None, None, eps=0.0), VALUE, "eps"),
    # gk.optim
    ("AdamW_lr", lambda: gk.optim.AdamW([torch.nn.Parameter(_x(4))], lr=-1.0), VALUE, "lr"),
    ("AdamW_betas", lambda: gk.optim.AdamW([torch.nn.Parameter(_x(4))], betas=(0.9,)), VALUE, "betas"),
    ("AdamW_betas_number", lambda: gk.optim.AdamW([torch.nn.Parameter(_x(4))], betas=0.9), VALUE, "betas"),
    (
        "AdamW_l2_weight_decay",
        lambda: gk.optim.AdamW([{"params": [torch.nn.Parameter(_x(4))], "decoupled_weight_decay": False}]),
        VALUE,
        "decoupled_weight_decay",
    ),
    (
        "AdamW_load_adam",
        lambda: gk.optim.AdamW([p := torch.nn.Parameter(_x(4))]).load_state_dict(torch.optim.Adam([p]).state_dict()),
        VALUE,
        "decoupled_weight_decay",
    ),
    (
        "AdamW_max_grad_norm",
        lambda: gk.optim.AdamW([torch.nn.Parameter(_x(4))], max_grad_norm=torch.ones(2)),
        VALUE,
        "max_grad_norm",
    ),
    ("AdamW_sparse_grad", _step_with_sparse_grad, VALUE, "param_groups[0]['params'][0]"),
    (
        "WarmupCosineLR",
        lambda: gk.optim.warmup_cosine(gk.optim.AdamW([torch.nn.Parameter(_x(4))]), -1, 10),
        VALUE,
        "warmup_steps",
    ),
    ("clip_grad_norm_", lambda: gk.optim.clip_grad_norm_([torch.nn.Parameter(_x(4))], -1.0), VALUE, "max_norm"),
    # the rest of gk
    ("use_backend", lambda: gk.use_backend("tpu"), VALUE, "backend"),
    ("capture_step", lambda: gk.capture_step(lambda x: x, [1.0]), TYPE, "example_inputs[0]"),
    ("fuse_linear_cross_entropy", _fuse_non_linear_head, TYPE, "head"),
    ("patch", lambda: gk.patch(torch.nn.Linear(2, 2), loss="chunked"), VALUE, "loss"),
    ("patch_model", lambda: gk.patch(None), TYPE, "model"),
    ("patch_flag", lambda: gk.patch(torch.nn.Linear(2, 2), fuse_linear_act="no"), TYPE, "fuse_linear_act"),
    ("unpatch", lambda: gk.unpatch("model"), TYPE, "model"),
    (
        "fuse_linear_cross_entropy_name",
        lambda: gk.fuse_linear_cross_entropy(torch.nn.Linear(2, 2), "head", torch.nn.CrossEntropyLoss()),
        VALUE,
        "head",
    ),
    ("ignore_index", lambda: gk.cross_entropy(_x(4, 3), _labels(4), ignore_index=1.0), TYPE, "ignore_index"),
    ("seed_bool", lambda: gk.dropout(_x(8), seed=np.bool_(True)), TYPE, "seed"),
]


@pytest.mark.parametrize("call, python_class, argument", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_a_runtime_error_and_a_value_or_type_error(call, python_class, argument):
    with pytest.raises(RuntimeError) as caught:
        call()
    error = caught.value
    assert isinstance(error, python_class)
    assert isinstance(error, gk.ArgumentError if python_class is ValueError else gk.ArgumentTypeError)
    assert re.search(rf"(^|\W){re.escape(argument)}(\W|$)", str(error)), str(error)


def test_error_classes():
    assert issubclass(gk.ArgumentError, ValueError) and issubclass(gk.ArgumentError, RuntimeError)
    assert issubclass(gk.ArgumentTypeError, TypeError) and issubclass(gk.ArgumentTypeError, RuntimeError)
    assert issubclass(gk.BackendError, RuntimeError) and not issubclass(gk.BackendError, (ValueError, TypeError))
    # one class, wherever it is imported from
    assert gk.BackendError is errors.BackendError is gk._backend.BackendError


def _swiglu_torch(gate, up):
    return F.silu(gate) * up


# (id, PyTorch's function, ours, the positional arguments both get)
SAME_INPUT = [
    ("cross_entropy_batch", F.cross_entropy, gk.cross_entropy, (_x(4, 3), _labels(5))),
    ("cross_entropy_probs_shape", F.cross_entropy, gk.cross_entropy, (_x(4, 3), _x(4, 2))),
    ("cross_entropy_target_dtype", F.cross_entropy, gk.cross_entropy, (_x(4, 3), _labels(4).short())),
    ("cross_entropy_weight_shape", F.cross_entropy, gk.cross_entropy, (_x(4, 3), _labels(4), torch.ones(2))),
    ("cross_entropy_int_input", F.cross_entropy, gk.cross_entropy, (_labels(4, 3), _labels(4))),
    (
        "cross_entropy_reduction",
        partial(F.cross_entropy, reduction="avg"),
        partial(gk.cross_entropy, reduction="avg"),
        (_x(4, 3), _labels(4)),
    ),
    ("layer_norm_shape", F.layer_norm, gk.layer_norm, (_x(2, 5), (4,))),
    ("layer_norm_weight", F.layer_norm, gk.layer_norm, (_x(2, 5), (5,), torch.ones(4))),
    ("rms_norm_shape", F.rms_norm, gk.rms_norm, (_x(2, 5), (4,))),
    ("batch_norm_running_mean", F.batch_norm, gk.batch_norm, (_x(4, 3), torch.zeros(2), torch.ones(2))),
    ("batch_norm_one_value", F.batch_norm, gk.batch_norm, (_x(1, 3), None, None, None, None, True)),
    ("linear_dtype", F.linear, gk.linear_act, (_x(2, 3), _x(4, 3, dtype=torch.float64))),
    ("linear_shape", F.linear, gk.linear_act, (_x(2, 3), _x(4, 5))),
    ("linear_bias_shape", F.linear, gk.linear_act, (_x(2, 3), _x(4, 3), _x(5))),
    ("swiglu_shape", _swiglu_torch, gk.swiglu, (_x(2, 3), _x(2, 4))),
    ("dropout_p", F.dropout, gk.dropout, (_x(8), 2.0)),
    ("AdamW_lr", torch.optim.AdamW, gk.optim.AdamW, ([torch.nn.Parameter(_x(4))], -1.0)),
]


@pytest.mark.parametrize("theirs, ours, args", [case[1:] for case in SAME_INPUT], ids=[c[0] for c in SAME_INPUT])
def test_caught_as_pytorch_error_is(theirs, ours, args):
    """Whatever PyTorch's error is an instance of (RuntimeError, ValueError, TypeError),
    ours is too: code that catches PyTorch's catches ours. (Ours may be more: PyTorch
    raises ValueError, not RuntimeError, for some input, such as cross_entropy's batch
    sizes that differ.)"""
    with pytest.raises(Exception) as caught:
        theirs(*args)
    classes = tuple(c for c in (RuntimeError, ValueError, TypeError) if isinstance(caught.value, c))
    assert classes, f"PyTorch raised {type(caught.value).__name__}"
    with pytest.raises(Exception) as ours_caught:
        ours(*args)
    assert isinstance(ours_caught.value, (gk.ArgumentError, gk.ArgumentTypeError)), repr(ours_caught.value)
    assert all(isinstance(ours_caught.value, c) for c in classes), (repr(ours_caught.value), classes)


# (id, PyTorch's call, ours): arguments as PyTorch takes them, NumPy scalars and one-element tensors among them
NUMPY_SCALARS = [
    ("layer_norm_eps", lambda f: f.layer_norm(_X, (5,), eps=np.float32(1e-3)), gk.functional),
    ("batch_norm_momentum", lambda f: f.batch_norm(_X, torch.zeros(5), torch.ones(5), None, None, True,
                                                   np.float32(0.5), np.int64(1)), gk.functional),
    ("cross_entropy_ignore_index", lambda f: f.cross_entropy(_X, _TARGET, ignore_index=np.int64(1)), gk.functional),
    ("cross_entropy_ignore_index_tensor", lambda f: f.cross_entropy(_X, _TARGET, ignore_index=torch.tensor(1)),
     gk.functional),
    ("cross_entropy_label_smoothing", lambda f: f.cross_entropy(_X, _TARGET, label_smoothing=np.float64(0.1)),
     gk.functional),
    ("dropout_p", lambda f: f.dropout(_X, p=np.float32(0.0)), gk.functional),
]  # fmt: skip
_X, _TARGET = _x(4, 5), _labels(4, classes=5)


@pytest.mark.parametrize("call, ours", [c[1:] for c in NUMPY_SCALARS], ids=[c[0] for c in NUMPY_SCALARS])
def test_numpy_scalars_as_pytorch_takes_them(call, ours):
    torch.testing.assert_close(call(ours), call(F))


def test_numpy_ints_where_ints_are_taken():
    x = _x(8)
    assert torch.equal(gk.dropout(x, seed=np.int64(3)), gk.dropout(x, seed=3))
    weight, target = _x(3, 5), _labels(4)
    torch.testing.assert_close(
        gk.linear_cross_entropy(_X, weight, target, chunk_size=np.int32(2)),
        gk.linear_cross_entropy(_X, weight, target, chunk_size=2),
    )
    q, k, cos, sin = _x(1, 2, 3, 4), _x(1, 2, 3, 4), _x(1, 3, 4), _x(1, 3, 4)
    rotated = gk.apply_rotary_pos_emb(q, k, cos, sin, np.int64(1)), gk.apply_rotary_pos_emb(q, k, cos, sin)
    for ours, theirs in zip(*rotated):
        assert torch.equal(ours, theirs)
    optimizer = gk.optim.AdamW([torch.nn.Parameter(x)], lr=np.float32(1e-3), betas=(np.float64(0.9), 0.99))
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.99)
    assert gk.optim.warmup_cosine(optimizer, np.int64(2), np.int64(10)).total_steps == 10
