"""The tests' tolerances, in one place.

fp64 and fp32 results are compared elementwise with PyTorch's; where that
fails, ours must stray from the float64 reference no further than PyTorch's
(a gradient that is zero in exact arithmetic, say), or be within the same
relative tolerance of it by norm (sums in another order on a GPU).
A bf16/fp16 result is compared with the float64 reference by relative norm
error, and must be no worse than PyTorch's own low-precision result times
LOWP_FACTOR.
"""

from __future__ import annotations

import sys
import types

import torch
import torch.nn.functional as F

TOLERANCES = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6)}
LOWP_FACTOR = 2.0
# conftest's small_blocks fixture shrinks Triton's cross-entropy kernels to
# blocks of SMALL_BLOCK classes: LOOPED_CLASSES and PIPELINED_LOOPED_CLASSES then
# take three column blocks, the last one partial. Contiguous rows of the latter are
# a multiple of 16 long, which the forward loads through Triton's pipeline (the
# former's, a block ahead into registers).
SMALL_BLOCK, LOOPED_CLASSES, PIPELINED_LOOPED_CLASSES = 128, 300, 304
# Floor for the low-precision bound: when PyTorch's own low-precision error
# happens to be tiny, a result within a couple of roundings is still right.
LOWP_FLOOR = {torch.bfloat16: 2 * 2.0**-8, torch.float16: 2 * 2.0**-11}
# PyTorch's own form of each activation the ops fuse (linear_act's, batch_norm's)
TORCH_ACTIVATIONS = {
    "none": lambda z: z,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
    "silu": F.silu,
    "quick_gelu": lambda z: z * torch.sigmoid(1.702 * z),  # CLIP's, as transformers' QuickGELUActivation
    "relu_squared": lambda z: F.relu(z).square(),  # Primer's, as transformers' ReLUSquaredActivation
}


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative norm error of ``a`` against ``ref`` (both widened to float64)."""
    a, ref = a.double(), ref.double()
    return ((a - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_matches(
    ours: torch.Tensor, theirs: torch.Tensor, reference: torch.Tensor | None = None, factor: float = LOWP_FACTOR
) -> float:
    """Check ``ours`` against PyTorch's ``theirs`` (same dtype) and, for bf16/fp16,
    against the float64 ``reference``. Returns the error measured."""
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    assert ours.dtype == theirs.dtype, (ours.dtype, theirs.dtype)
    if ours.dtype in TOLERANCES:
        try:
            torch.testing.assert_close(ours, theirs, **TOLERANCES[ours.dtype])
        except AssertionError:
            if reference is None:
                raise
            ours_err, theirs_err = _max_abs(ours, reference), _max_abs(theirs, reference)
            # a sum in another order or the GPU's exp/erf can cost an element its last digits:
            # the whole result within the relative tolerance of float64 passes too
            within = rel_err(ours, reference) <= TOLERANCES[ours.dtype]["rtol"]
            assert ours_err <= theirs_err or within, (
                f"{ours.dtype}: max error {ours_err:.3g} vs PyTorch's {theirs_err:.3g}, relative "
                f"{rel_err(ours, reference):.3g}"
            )
        return _max_abs(ours, theirs)
    assert reference is not None, "low-precision results need a float64 reference"
    ours_err, theirs_err = rel_err(ours, reference), rel_err(theirs, reference)
    bound = max(factor * theirs_err, LOWP_FLOOR[ours.dtype])
    assert ours_err <= bound, f"{ours.dtype}: relative error {ours_err:.3g} > {bound:.3g} (PyTorch's: {theirs_err:.3g})"
    return ours_err


def gradcheck(fn, inputs, **kwargs) -> bool:
    """``torch.autograd.gradcheck(fn, inputs, **kwargs)``: the whole Jacobian, element by element
    (two calls of ``fn`` an input element, a backward an output element), except where
    the Triton interpreter runs the kernels, each launch there a tenth of a second or
    so: its fast mode there, the numerical and the analytical Jacobian compared along
    random directions (``v^T J u``: a few calls and backwards in all), which a wrong
    gradient fails as well, short of an error within the tolerance of that sum. The
    NumPy backend checks the same op element by element."""
    import gpukernels as gk

    device = next(t.device for t in inputs if isinstance(t, torch.Tensor))
    interpreted = device.type == "cpu" and gk.backend_name(device) == "triton"
    return torch.autograd.gradcheck(fn, inputs, fast_mode=interpreted, **kwargs)


def run_kernel(module, op, *args):
    """Run op ``op``'s kernel from the backend module ``module`` directly: its
    outputs allocated by the op's spec, the kernel writing into them (the CuPy
    host target runs CuPy's kernels on CPU tensors, which no backend serves)."""
    outputs = op.spec(*args, "")
    getattr(module, op.name)(*args, *((outputs,) if isinstance(outputs, torch.Tensor) else outputs))
    return outputs


def count_launches(kernels, monkeypatch) -> list[str]:
    """The names of the Triton kernels of module ``kernels`` as they are launched,
    in order, from now on."""
    from triton.runtime.jit import KernelInterface

    from gpukernels.backends.triton._launch import Kernel

    launched = []

    def counting(name, run):
        def run_and_count(*args, **kwargs):
            launched.append(name)
            return run(*args, **kwargs)

        return run_and_count

    for name, value in vars(kernels).items():
        if isinstance(value, Kernel) and value.compiled:
            # kernel[grid](...) calls _launch_bound; so does kernel.launch(...) in the tests,
            # which check launch keys (conftest.py)
            monkeypatch.setattr(value, "_launch_bound", counting(name, value._launch_bound))
        elif isinstance(value, Kernel):  # the interpreter's function runs the launch
            monkeypatch.setattr(value.fn, "run", counting(name, value.fn.run))
        elif isinstance(value, KernelInterface):
            monkeypatch.setattr(value, "run", counting(name, value.run))
    return launched


def record_calls(monkeypatch, module, name: str, record) -> list:
    """``record(*args)`` of each call of the function ``module.<name>`` from now on, in order
    (the function still runs)."""
    calls, function = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *args: calls.append(record(*args)) or function(*args))
    return calls


def applied_to_itself(y: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether the op that made ``y`` took the leaf ``x`` itself, of ``y``'s shape: no view
    of ``x`` around the op (each an autograd node, with host time of its own)."""
    return y.shape == x.shape and y.grad_fn.next_functions[0][0].variable is x


def assert_same_output_and_grads(ours, theirs, leaf: torch.Tensor) -> None:
    """``ours()`` and ``theirs()`` (fp64) give the same output and the same gradient of a
    random projection of it with respect to ``leaf``."""
    y, ref = ours(), theirs()
    torch.testing.assert_close(y, ref, **TOLERANCES[torch.float64])
    up = torch.randn_like(ref)
    (grad,), (ref_grad,) = (torch.autograd.grad(out, leaf, up) for out in (y, ref))
    torch.testing.assert_close(grad, ref_grad, **TOLERANCES[torch.float64])


def register_modules(monkeypatch, modules: dict[str, dict[str, object]]) -> None:
    """Each ``{module name: {attribute: value}}`` as an imported module for the test, in
    ``sys.modules``, where gk.patch looks up the classes of libraries CI cannot install."""
    for name, attributes in modules.items():
        module = types.ModuleType(name)
        vars(module).update(attributes)
        monkeypatch.setitem(sys.modules, name, module)


def torch_batch_norm_needs_cpu(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> bool:
    """Whether PyTorch's batch_norm must serve as the reference on the CPU: torch 2.11's CUDA
    backward with a bias but no weight gives the bias a zero gradient or raises 'tensor does
    not have a device' (seen on an H200)."""
    return x.is_cuda and weight is None and bias is not None


def assert_out_dtype_rounds_once(op, x: torch.Tensor, params, out_dtype: torch.dtype, dy: torch.Tensor) -> None:
    """A norm's ``op(x, *params, out_dtype=out_dtype)`` on fp32 ``x``, forward and
    backward, bit for bit ``op(x, *params)`` cast to ``out_dtype`` afterwards (its
    result rounded once from the same fp32 values; ``dy``, in ``out_dtype``, widened
    exactly), and against PyTorch's and the float64 reference as any result."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, *params)]
    y = op(*leaves, out_dtype=out_dtype)
    y.backward(dy)
    cast = [t.detach().clone().requires_grad_() for t in (x, *params)]
    y_cast = op(*cast).to(out_dtype)
    y_cast.backward(dy)
    assert y.dtype == out_dtype
    assert torch.equal(y, y_cast)
    for ours, theirs in zip(leaves, cast):
        assert ours.grad.dtype == ours.dtype
        assert torch.equal(ours.grad, theirs.grad)


def assert_autocast_reads_input_as_it_is(op, x: torch.Tensor, params, dy: torch.Tensor) -> None:
    """A norm's ``op(x, *params)`` under bf16 autocast on a narrower ``x``: bit for bit
    ``op(x.float(), *params)`` without autocast (fp32, as PyTorch's CUDA autocast casts the
    input up), forward and backward, its gradient in x's dtype, but without that fp32 copy of
    x: the tensors the backward keeps are x itself and fp32 statistics, none of x's size in fp32."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, *params)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            y = op(*leaves)
    y.backward(dy)
    cast = [t.detach().clone().requires_grad_() for t in (x, *params)]
    y_cast = op(cast[0].float(), *cast[1:])
    y_cast.backward(dy)
    assert y.dtype == torch.float32 and torch.equal(y, y_cast)
    for ours, theirs in zip(leaves, cast):
        assert ours.grad.dtype == ours.dtype
        assert torch.equal(ours.grad, theirs.grad)
    assert any(t.data_ptr() == leaves[0].data_ptr() and t.dtype == x.dtype for t in saved)
    assert not [t for t in saved if t.dtype == torch.float32 and t.numel() == x.numel()]


def assert_parametrized_weight_read(ours: torch.nn.Module, theirs: torch.nn.Module, device) -> None:
    """``ours`` computes what ``theirs`` (the torch module it replaces, of the same state)
    computes once both have their weight parametrized (doubled): a parametrized weight is no
    longer in the module's table of parameters, where our modules read their state first."""
    from torch.nn.utils import parametrize

    class Doubled(torch.nn.Module):
        def forward(self, t):
            return 2 * t

    with torch.no_grad():
        ours.weight.copy_(torch.linspace(0.5, 1.5, ours.weight.numel()))
    theirs.load_state_dict(ours.state_dict())
    ours, theirs = ours.to(device), theirs.to(device)
    for module in (ours, theirs):
        parametrize.register_parametrization(module, "weight", Doubled())
    x = torch.randn(3, ours.weight.numel(), generator=torch.Generator().manual_seed(0)).to(device)
    torch.testing.assert_close(ours(x), theirs(x), **TOLERANCES[torch.float32])


class LoRA(torch.nn.Module):
    """A LoRA layer as peft wraps a Linear or GPT-2's Conv1D (weight stored (in, out)) with: the
    base layer's output plus a low-rank term of its input."""

    def __init__(self, base: torch.nn.Module, rank: int = 2):
        super().__init__()
        linear = isinstance(base, torch.nn.Linear)
        features_in, features_out = (base.in_features, base.out_features) if linear else base.weight.shape
        self.base_layer = base
        self.lora_A = torch.nn.Linear(features_in, rank, bias=False, dtype=base.weight.dtype)
        self.lora_B = torch.nn.Linear(rank, features_out, bias=False, dtype=base.weight.dtype)

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(x))


# (input dtype, residual dtype) of the ops that add a residual to a norm's input or output (add_norm, norm_add):
# a bf16 branch output added to the fp32 residual stream of a model under autocast, one dtype for both, and two
# dtypes whose sum neither holds (its gradient cast to each)
RESIDUAL_DTYPES = [
    (torch.bfloat16, torch.float32),
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.float64, torch.float64),
    (torch.float16, torch.bfloat16),
]


def dtype_pair_id(pair) -> str:
    return "+".join(str(d).removeprefix("torch.") for d in pair)


def residual_norm_inputs(shape, norm_shape, dtypes, device, seed=0, weight_scale=1.0):
    """``(x, residual, weight, bias)`` for a norm with a residual: x and the residual in ``dtypes``,
    fp32 parameters of ``norm_shape``."""
    g = torch.Generator().manual_seed(seed)

    def draw(shape, dtype, scale=1.0, shift=0.0):
        return (torch.randn(shape, generator=g, dtype=torch.float64) * scale + shift).to(device, dtype)

    x, residual = draw(shape, dtypes[0], 2.0, 0.5), draw(shape, dtypes[1], 3.0, 1.0)
    weight, bias = draw(norm_shape, torch.float32, weight_scale), draw(norm_shape, torch.float32)
    return x, residual, weight, bias
