"""Our Triton kernels under torch.compile: on the Triton backend's compiled path
(CUDA tensors), AOTAutograd traces each op's implementation, so each launch is a
``triton_kernel_wrapper_functional`` node that Inductor compiles and launches
itself (ops/_op.py); every other path keeps the op as one opaque node.

The tracing checks run in a subprocess without the interpreter, so that the
kernels are ``triton.jit`` functions, through the stub driver of
bench/host_time.py: Triton lowers each kernel to TTIR for its sm_90 target, from
which torch finds the arguments the kernel writes, as on a GPU. The graphs are
AOTAutograd's as Inductor has it make them (functorch's ``aot_function`` with
Inductor's decompositions and partitioner), on fake tensors, and Inductor's own
reinplacing pass runs on them: what it leaves to copy before a launch is what
Inductor would copy. CPU tensors stand in for CUDA tensors, routed to the Triton
backend as bench/host_time.py routes them: a CPU-only torch cannot take fake
CUDA tensors through autograd or views (it has no CUDA device guard), so fake
CUDA tensors are traced for two forwards only. Nothing is launched.

    python tests/test_inductor.py    # the subprocess: its findings, as JSON
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import traceback

import pytest
import torch
import triton
from test_host_time import load_host_time

import gpukernels as gk

HAS_CUDA = torch.cuda.is_available()


# ---------------------------------------------------------------- the subprocess


def _leaf(*shape):
    return torch.randn(*shape).requires_grad_()


def _cases() -> dict:
    """name -> (function of tensors, its arguments): every op family with a Triton path but AdamW."""
    tokens = torch.randint(0, 32, (8,))
    return {
        "layer_norm": (lambda x, w, b: gk.layer_norm(x, (64,), w, b), (_leaf(8, 64), _leaf(64), _leaf(64))),
        "rms_norm": (lambda x, w: gk.rms_norm(x, (64,), w), (_leaf(8, 64), _leaf(64))),
        "add_rms_norm": (
            lambda x, r, w: sum(t.sum() for t in gk.add_rms_norm(x, r, (64,), w, cast_before_weight=True)),
            (_leaf(8, 64), _leaf(8, 64), _leaf(64)),
        ),
        "add_layer_norm": (
            lambda x, r, w, b: sum(t.sum() for t in gk.add_layer_norm(x, r, (64,), w, b)),
            (_leaf(8, 64), _leaf(8, 64), _leaf(64), _leaf(64)),
        ),
        "gated_act": (gk.swiglu, (_leaf(8, 64), _leaf(8, 64))),
        "gated_act_packed": (gk.swiglu, (_leaf(8, 128),)),
        "gated_act_chunks": (lambda x: gk.swiglu(*x.chunk(2, dim=-1)), (_leaf(8, 128),)),
        "rope": (
            lambda q, k: sum(t.sum() for t in gk.apply_rotary_pos_emb(q, k, torch.ones(1, 4, 8), torch.zeros(1, 4, 8))),
            (_leaf(2, 3, 4, 8), _leaf(2, 1, 4, 8)),
        ),
        "dropout": (lambda x: gk.dropout(x, 0.1, training=True), (_leaf(8, 64),)),
        "cross_entropy": (lambda z, t: gk.cross_entropy(z, t, label_smoothing=0.1), (_leaf(8, 32), tokens)),
        "cross_entropy_probs": (lambda z, q: gk.cross_entropy(z, q.softmax(-1)), (_leaf(8, 32), _leaf(8, 32))),
        "batch_norm": (
            lambda x, mean, var, w, b: gk.batch_norm(x, mean, var, w, b, training=True),
            (_leaf(8, 16, 4), torch.zeros(16), torch.ones(16), _leaf(16), _leaf(16)),
        ),
        "batch_norm_relu": (
            lambda x, mean, var, w, b: gk.batch_norm(x, mean, var, w, b, training=True, activation="relu"),
            (_leaf(8, 16, 4), torch.zeros(16), torch.ones(16), _leaf(16), _leaf(16)),
        ),
        "batch_norm_add_relu": (
            lambda x, r, mean, var: gk.batch_norm(x, mean, var, training=True, activation="relu", residual=r),
            (_leaf(8, 16, 4), _leaf(8, 16, 4), torch.zeros(16), torch.ones(16)),
        ),
        **{
            f"linear_act_{activation}": (
                lambda x, w, b, activation=activation: gk.linear_act(x, w, b, activation=activation),
                (_leaf(8, 32), _leaf(16, 32), _leaf(16)),
            )
            for activation in ("gelu", "relu")  # relu: applied in place on the product
        },
        # chunks of 4 rows: two forward launches
        "linear_cross_entropy": (
            lambda h, w, t: gk.linear_cross_entropy(h, w, t, chunk_size=4),
            (_leaf(8, 16), _leaf(32, 16), tokens),
        ),
    }


class _Model(torch.nn.Module):
    """Every patched module kind: Linear+GELU and Linear+SiLU fuse into linear_act."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.body = nn.Sequential(
            nn.Linear(32, 64),
            nn.GELU(),
            nn.LayerNorm(64),
            nn.Dropout(0.1),
            nn.Linear(64, 64),
            nn.SiLU(),
            nn.BatchNorm1d(64),
            nn.RMSNorm(64),
            nn.Linear(64, 10),
        )
        self.loss = nn.CrossEntropyLoss(label_smoothing=0.1)

    def forward(self, x, target):
        return self.loss(self.body(x), target)


def _aot_graphs(f, *args, **options) -> list:
    """The forward and backward graphs AOTAutograd makes of ``f`` (a scalar or a tensor to
    sum) as torch.compile's Inductor has it make them (its decompositions and partitioner,
    input mutations kept in the graph); the forward's only for real tensors, which it stops
    before the graph runs."""
    from functorch.compile import aot_function, min_cut_rematerialization_partition
    from torch._inductor.decomposition import select_decomp_table
    from torch._subclasses.fake_tensor import FakeTensor

    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        if not fake:
            raise _Traced
        return gm

    fake = all(isinstance(a, FakeTensor) for a in args)
    try:
        out = aot_function(
            f,
            fw_compiler=keep,
            bw_compiler=keep,
            decompositions=select_decomp_table(),
            partition_fn=min_cut_rematerialization_partition,
            keep_inference_input_mutations=True,
            **options,
        )(*args)
    except _Traced:
        return graphs
    if out.requires_grad:
        out.float().sum().backward()
    return graphs


class _Traced(Exception):
    """Raised by the compiler of a graph traced from real tensors, before it runs."""


def _summary(gm) -> dict:
    """A graph's Triton kernel nodes (kernel, defining module, and the arguments Inductor
    would copy before the launch: those its reinplacing pass, run here, cannot write in
    place) and its opaque gpukernels ops."""
    from torch._guards import detect_fake_mode
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table, triton_kernel_wrapper_functional
    from torch._inductor.fx_passes.reinplace import reinplace_inplaceable_ops
    from torch._inductor.fx_utils import FakeTensorUpdater
    from torch._inductor.virtualized import V
    from triton.runtime.jit import JITFunction

    mode = detect_fake_mode([node.meta.get("val") for node in gm.graph.find_nodes(op="placeholder")])
    if mode is not None:
        with V.set_fake_mode(mode):
            # FakeTensorUpdater takes the graph module (torch 2.13), or the graph (torch 2.11)
            updated = gm if "gm" in inspect.signature(FakeTensorUpdater).parameters else gm.graph
            reinplace_inplaceable_ops(FakeTensorUpdater(updated), gm.graph)
    kernels, opaque = [], []
    for node in gm.graph.nodes:
        if node.target is triton_kernel_wrapper_functional:
            kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
            while not isinstance(kernel, JITFunction):  # an autotuner holding the launch's num_warps
                kernel = kernel.fn
            arguments = {
                **{k: v.meta["val"] if isinstance(v, torch.fx.Node) else v for k, v in node.kwargs["kwargs"].items()},
                **kernel_side_table.get_constant_args(node.kwargs["constant_args_idx"]),
            }
            kernels.append(
                {
                    "name": kernel.__name__,
                    "module": kernel.fn.__module__,
                    "id": id(kernel),
                    "copied": list(node.kwargs["tensors_to_clone"]),
                    "wide_ints": {
                        k: v
                        for k, v in arguments.items()
                        if type(v) is int and not -(2**31) <= v < 2**31 and not k.isupper()
                    },
                    "from_source": _lowered_from_source(kernel, arguments) if mode is not None else None,
                }
            )
        elif getattr(node.target, "namespace", None) == "gpukernels":
            opaque.append(str(node.target))
    return {"kernels": kernels, "opaque": opaque}


def _lowered_from_source(kernel, arguments: dict) -> str | None:
    """Inductor compiles a kernel from the source of it and of the functions it calls,
    in a module of their own: that module loaded, the kernel lowered to TTIR for these
    arguments (with the stub driver's target); the error, or None."""
    from torch._higher_order_ops.triton_kernel_wrap import generate_ttir
    from torch._inductor.codecache import PyCodeCache
    from torch._inductor.codegen.triton import TritonKernel
    from torch._inductor.codegen.wrapper import user_defined_triton_kernel_transitive_closure_source_code

    try:
        source = user_defined_triton_kernel_transitive_closure_source_code(kernel)
        module = PyCodeCache.load(f"{TritonKernel.gen_common_triton_imports()}\n@triton.jit\n{source}")
        generate_ttir(getattr(module, kernel.__name__), arguments, {})
    except Exception:
        return traceback.format_exc(limit=-3)
    return None


def _traced(f, *args, **options) -> dict:
    try:
        return {"graphs": [_summary(gm) for gm in _aot_graphs(f, *args, **options)]}
    except Exception:
        return {"error": traceback.format_exc()}


def _check_targets_as_on_cuda(last, target, ignore_index, classes):
    """cross_entropy's target check as for CUDA tensors: a device-side assert (on CPU
    tensors the host reads the flag, which a trace cannot)."""
    torch._assert_async(last.ok, "target out of bounds")


def _accesses(analysis) -> tuple:
    """What torch's analysis of a kernel's arguments found: the written ones (torch 2.11's
    list), or those written and read and whether an epilogue can fuse (torch 2.13's)."""
    if isinstance(analysis, list):
        return (sorted(analysis),)
    read_writes = analysis.read_writes
    return (
        sorted(d.name for d in read_writes.writes),
        sorted(d.name for d in read_writes.reads),
        analysis.can_fuse_epilogue,
    )


def _check_shared_analyses() -> dict:
    """Every call of torch's analysis of a kernel's arguments from now on answered by
    ours, which keeps it per key, and by torch's own, run again: counts, and the
    calls whose answers differ."""
    from torch._higher_order_ops import triton_kernel_wrap

    from gpukernels.backends.triton._launch import _ACCESS_ANALYSES, share_access_analyses

    name = next(n for n in _ACCESS_ANALYSES if hasattr(triton_kernel_wrap, n))
    torchs = getattr(triton_kernel_wrap, name)
    kept = share_access_analyses()
    shared = getattr(triton_kernel_wrap, name)
    checks = {"calls": 0, "differ": [], "kept": kept}

    def checked(kernel, kwargs, tma_descriptor_metadata):
        checks["calls"] += 1
        answer = shared(kernel, kwargs, tma_descriptor_metadata)
        if _accesses(answer) != _accesses(torchs(kernel, kwargs, tma_descriptor_metadata)):
            checks["differ"].append(getattr(kernel, "__name__", repr(kernel)))
        return answer

    setattr(triton_kernel_wrap, name, checked)
    return checks


def _analysis_keys() -> dict:
    """Whether ``access_analysis_key`` tells apart what the TTIR lowering reads."""
    import sympy
    from torch._subclasses.fake_tensor import FakeTensorMode
    from triton.runtime.autotuner import Config, autotune

    from gpukernels.backends.triton._launch import access_analysis_key
    from gpukernels.backends.triton._norm import norm_fwd_kernel

    kernel = norm_fwd_kernel.fn

    def arguments(dtype=torch.float32, **changed):
        with FakeTensorMode():
            x = torch.empty(4, dtype=dtype)
        tensors = dict(X=x, R=None, W=None, B=None, Y=x, S=None, Stats=x)
        return {**tensors, "D": 8, "eps_hi": 1, "eps_lo": 2, "offset": None, "CENTERED": True, **changed}

    key = access_analysis_key(kernel, arguments(), {})
    return {
        "ours": key is not None,
        "same": access_analysis_key(kernel, arguments(), {}) == key,
        "dtype": access_analysis_key(kernel, arguments(torch.bfloat16), {}) != key,
        "int": access_analysis_key(kernel, arguments(D=16), {}) != key,
        "symbolic_as_2": access_analysis_key(kernel, arguments(D=sympy.Symbol("s")), {})
        == access_analysis_key(kernel, arguments(D=2), {}),
        "real_tensor": access_analysis_key(kernel, arguments(X=torch.empty(4)), {}) is None,
        "tma": access_analysis_key(kernel, arguments(), {"X": ("stable", ([8],))}) is None,
        "not_ours": access_analysis_key(triton.jit(kernel.fn), arguments(), {}) is None,
        "autotuner": access_analysis_key(
            autotune(configs=[Config({"D": 16}, num_warps=8)], key=[])(kernel), arguments(), {}
        )
        == access_analysis_key(kernel, arguments(D=16), {}),
    }


def _worker() -> dict:
    from torch._inductor.codegen.wrapper import user_defined_triton_kernel_transitive_closure_source_code as source_code
    from torch._library.triton import get_triton_kernels_for_op
    from torch._subclasses.fake_tensor import FakeTensorMode

    host_time = load_host_time()
    stub = bool(os.environ.get("TRITON_LIBCUDA_PATH"))
    if stub:
        host_time.install_stub_driver()
    host_time.route_cpu_tensors_to_triton()
    from gpukernels.backends.triton import _common, cross_entropy, linear_cross_entropy
    from gpukernels.ops._op import OPS

    cross_entropy.check_targets = linear_cross_entropy.check_targets = _check_targets_as_on_cuda
    analyses = _check_shared_analyses()
    torch.manual_seed(0)
    result = {"stub": stub, "keys": _analysis_keys()}
    model = _Model()  # patched on real tensors: patch() traces the model to find what to fuse
    gk.patch(model)
    result["patched"] = sorted(type(m).__name__ for m in model.modules() if type(m).__module__.startswith("gpukernels"))
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        result["cases"] = {name: _traced(f, *args) for name, (f, args) in _cases().items()}
        state = {name: mode.from_tensor(t) for name, t in [*model.named_parameters(), *model.named_buffers()]}

        def step(x, target, *tensors):
            return torch.func.functional_call(model, dict(zip(state, tensors)), (x, target))

        result["model"] = _traced(step, torch.randn(8, 32), torch.randint(0, 10, (8,)), *state.values())

    # symbolic sizes (real inputs, made symbolic by AOTAutograd; its compiler stops it before
    # it runs the graph): the launchers work on ints, so the op stays opaque
    result["dynamic"] = _traced(lambda x: gk.layer_norm(x, (64,)), torch.randn(8, 64), dynamic=True)

    # fake CUDA tensors, forwards without views (see the module doc)
    _common._sm_count = lambda device_index: 132
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.randn(8, 64, device="cuda")
        result["cuda"] = {
            "layer_norm": _traced(lambda x: gk.layer_norm(x, (64,)), x),
            "dropout": _traced(lambda x: gk.dropout(x, 0.1, training=True), x),
        }

    # AOTAutograd's cache key: the sources of the kernels torch lists for each op
    listed = {op: {id(k) for k in get_triton_kernels_for_op(f"gpukernels::{op}")} for op in OPS}
    launched = {
        (k["name"], k["id"])
        for case in [*result["cases"].values(), result["model"]]
        for graph in case.get("graphs", [])
        for k in graph["kernels"]
    }
    traceable = [ids for ids in listed.values() if ids]  # AdamW's op lists none: it stays opaque
    result["unlisted"] = sorted(name for name, kernel in launched if not all(kernel in ids for ids in traceable))
    result["listed"] = {op: len(ids) for op, ids in listed.items()}
    sources = [(k.__name__, source_code(k)) for k in get_triton_kernels_for_op("gpukernels::layer_norm_fwd")]
    result["unsourced"] = [name for name, source in sources if f"def {name}(" not in source]
    result["analyses"] = {"calls": analyses["calls"], "kept": len(analyses["kept"]), "differ": analyses["differ"]}
    return result


# ---------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def traced():
    """The subprocess's findings, through the stub driver when gcc can build it."""
    host_time = load_host_time()
    if shutil.which("gcc"):
        build = host_time.build(host_time.DEFAULT_BUILD)
        env = host_time.stub_environment(build, build / f"triton-cache-{triton.__version__}")
    else:
        env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "GPUKERNELS_BACKEND")}
    run = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.splitlines()[-1])


def _graphs(case: dict) -> list:
    assert "error" not in case, case.get("error")
    return case["graphs"]


# the fused linear + cross-entropy stays one node (its matmuls as in eager: see ops/_op.py)
OPAQUE_CASES = {"linear_cross_entropy": ("linear_cross_entropy_fwd", "linear_cross_entropy_bwd")}


@pytest.mark.parametrize("name", [name for name in _cases() if name not in OPAQUE_CASES])
def test_forward_and_backward_are_our_kernels(traced, name):
    """Each family's forward and backward graphs launch our Triton kernels, with no opaque op left."""
    graphs = _graphs(traced["cases"][name])
    assert len(graphs) == 2, "a forward and a backward graph"
    for graph, which in zip(graphs, ("forward", "backward")):
        assert graph["kernels"], f"{which}: no Triton kernel node"
        assert all(k["module"].startswith("gpukernels.backends.triton.") for k in graph["kernels"])
        assert not graph["opaque"], f"{which}: opaque ops {graph['opaque']}"


@pytest.mark.parametrize("name", list(OPAQUE_CASES))
def test_ops_declared_untraced_stay_one_node(traced, name):
    """Traced, Inductor would lower the fused loss's matmuls itself: its mixed-precision
    accumulation to a cuBLAS kernel 5x slower than eager's (torch 2.11 on an H200), and an
    unaligned vocabulary's matmuls with padding copies. One node, its matmuls run as in eager."""
    graphs = _graphs(traced["cases"][name])
    assert len(graphs) == 2, "a forward and a backward graph"
    for graph, op in zip(graphs, OPAQUE_CASES[name]):
        assert graph["opaque"] == [f"gpukernels.{op}.default"] and not graph["kernels"]


# Known copies: (case, kernel argument) -> why. Each is a defect to fix, listed so that the test
# fails on any other copy, and when one of these goes.
KNOWN_COPIES = {
    # the zeroed arrival counters of the model's two norm backwards: the partitioner's CSE
    # merges equal torch.zeros calls, so one launch gets a copy (a 4-byte fill)
    ("model", "Counters"): "backends/triton/_common.py: arrival_counter under tracing",
}


def test_inductor_copies_only_the_known_arguments(traced):
    """Inductor copies an argument a kernel writes unless it can write it in place. Torch
    finds which arguments a kernel writes in its TTIR: our kernels write only their outputs
    and scratch buffers, which Inductor's reinplacing pass (run on the traced graphs) then
    writes in place, with no copy before the launch (batch_norm's running statistics too,
    which the op updates in place and the graph writes back)."""
    if not traced["stub"]:
        pytest.skip("gcc is needed to build the stub libcuda: without a driver torch assumes every argument written")
    cases = {**traced["cases"], "model": traced["model"]}
    copies = {
        (name, argument)
        for name, case in cases.items()
        for graph in _graphs(case)
        for k in graph["kernels"]
        for argument in k["copied"]
    }
    assert copies == set(KNOWN_COPIES)


def test_inductor_compiles_our_kernels_from_their_source(traced):
    if not traced["stub"]:
        pytest.skip("gcc is needed to build the stub libcuda: Triton lowers kernels for its target")
    failed = {
        k["name"]: k["from_source"]
        for case in [*traced["cases"].values(), traced["model"]]
        for graph in _graphs(case)
        for k in graph["kernels"]
        if k["from_source"]
    }
    assert not failed, "\n".join(f"{name}:\n{error}" for name, error in failed.items())


def test_integer_arguments_fit_in_32_bits(traced):
    """Inductor (torch 2.11) fails to generate the launch of a user-defined kernel given a
    Python int beyond 32 bits ('int' object has no attribute 'xreplace', seen on an H200):
    such values go to a kernel in a tensor, or split in two."""
    cases = {**traced["cases"], "model": traced["model"], **traced["cuda"]}
    wide = {
        (name, k["name"], argument): value
        for name, case in cases.items()
        for graph in _graphs(case)
        for k in graph["kernels"]
        for argument, value in k["wide_ints"].items()
    }
    assert wide == {}


def test_patched_model_is_our_kernels(traced):
    assert {"LayerNorm", "RMSNorm", "BatchNorm1d", "Dropout", "LinearAct", "CrossEntropyLoss"} <= set(traced["patched"])
    graphs = _graphs(traced["model"])
    assert len(graphs) == 2 and not any(graph["opaque"] for graph in graphs)
    used = {k["name"] for graph in graphs for k in graph["kernels"]}
    families = ("layer_norm", "rms_norm", "dropout", "batch_norm", "linear_act_gelu", "cross_entropy")
    for family in families:
        wanted = {k["name"] for graph in _graphs(traced["cases"][family]) for k in graph["kernels"]}
        assert wanted <= used, f"{family}: {sorted(wanted - used)} not in the model's graphs"


def test_symbolic_sizes_keep_the_op_opaque(traced):
    (graph,) = _graphs(traced["dynamic"])
    assert graph["opaque"] == ["gpukernels.layer_norm_fwd.default"] and not graph["kernels"]


def test_cuda_tensors_are_our_kernels(traced):
    for name, case in traced["cuda"].items():
        (graph,) = _graphs(case)
        assert graph["kernels"] and not graph["opaque"], name


def test_launched_kernels_are_in_the_cache_key(traced):
    """AOTAutograd's cache key hashes the kernel sources torch lists for each op: every
    kernel a traced op launches is listed (an edited kernel is not served from the cache)."""
    assert not traced["unlisted"] and not traced["unsourced"]
    untraced = {"adamw_step_", *(op for ops in OPAQUE_CASES.values() for op in ops), "linear_cross_entropy_grads_fwd"}
    assert {op for op, count in traced["listed"].items() if not count} == untraced


def test_argument_analyses_are_shared_and_equal_to_torchs(traced):
    """Torch lowers a traced kernel to TTIR to find the arguments it writes, at every
    launch in a graph and three times more in Inductor; ours keeps each answer per
    kernel and arguments as the lowering sees them, and gives torch's own answer."""
    analyses = traced["analyses"]
    assert not analyses["differ"]
    assert 0 < analyses["kept"] < analyses["calls"]
    assert all(traced["keys"].values()), traced["keys"]


def test_interpreter_and_numpy_paths_stay_opaque():
    """This process runs Triton's interpreter on CPU tensors: the op stays one node there, as on NumPy."""
    from functorch.compile import aot_function

    graphs = []
    x = torch.randn(4, 8)
    for backend in ("numpy", "triton"):
        with gk.use_backend(backend):
            aot_function(lambda x: gk.layer_norm(x, (8,)), fw_compiler=lambda gm, _: graphs.append(gm) or gm)(x)
    for graph in graphs:
        assert "torch.ops.gpukernels.layer_norm_fwd.default" in graph.code
        assert "triton_kernel_wrapper" not in graph.code


# ---------------------------------------------------------------- GPU tier


def _record_launches(monkeypatch) -> set:
    """Names of our kernels as the direct launcher launches them (eager calls)."""
    import importlib

    from gpukernels.backends.triton._launch import KERNELS
    from gpukernels.ops._op import OPS

    for family in {op.family for op in OPS.values()}:
        importlib.import_module(f"gpukernels.backends.triton.{family}")
    launched = set()
    for kernel in KERNELS:

        def recording(grid, *args, _kernel=kernel, _launch=kernel._launch_bound, **kwargs):
            launched.add(_kernel.fn.__name__)
            return _launch(grid, *args, **kwargs)

        monkeypatch.setattr(kernel, "_launch_bound", recording)
    return launched


def _record_copies(monkeypatch) -> list:
    """The arguments Inductor copies before launching a Triton kernel: those its
    reinplacing pass left to copy, read just before it lowers the copies."""
    from torch._higher_order_ops.triton_kernel_wrap import triton_kernel_wrapper_functional
    from torch._inductor.fx_passes import post_grad

    copies = []
    decompose = post_grad.decompose_triton_kernel_wrapper_functional

    def recording(graph):
        for node in graph.find_nodes(op="call_function", target=triton_kernel_wrapper_functional):
            copies.extend(node.kwargs["tensors_to_clone"])
        return decompose(graph)

    monkeypatch.setattr(post_grad, "decompose_triton_kernel_wrapper_functional", recording)
    return copies


def _running_means(model) -> list:
    return [m.running_mean for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)]


def _patched_model(state=None) -> torch.nn.Module:
    model = _Model()
    if state is not None:
        model.load_state_dict(state)
    model = model.cuda()
    gk.patch(model)
    for module in model.modules():
        if isinstance(module, gk.nn.Dropout):
            module.seed = 5  # the same mask on every call, eager and compiled
    return model


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_compiled_patched_model_matches_eager_and_launches_our_kernels(mode, monkeypatch):
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = _patched_model()
    compiled_model = _patched_model(eager.state_dict())
    compiled = torch.compile(compiled_model, mode=mode, fullgraph=True)
    x, target = torch.randn(64, 32, device="cuda"), torch.randint(0, 10, (64,), device="cuda")

    def step(model, forward):
        model.zero_grad(set_to_none=True)
        loss = forward(x, target)
        loss.backward()
        return loss.detach().clone(), [p.grad.clone() for p in model.parameters()]

    launched, copies = _record_launches(monkeypatch), _record_copies(monkeypatch)
    for i in range(3):  # reduce-overhead: a warm-up run, a recording, a replay
        expected = step(eager, eager)
        if i == 0:
            got, code = run_and_get_code(step, compiled_model, compiled)
        else:
            got = step(compiled_model, compiled)
        # Inductor's code around our kernels (the last Linear, the sums) may round differently
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(_running_means(compiled_model), _running_means(eager), rtol=1e-5, atol=1e-6)
    source = "\n".join(code)
    missing = [name for name in sorted(launched) if not re.search(rf"\b{name}(_\d+)?\b", source)]
    assert launched and not missing, f"eager launched {sorted(launched)}; not in Inductor's code: {missing}"
    assert set(copies) <= {argument for _, argument in KNOWN_COPIES}, copies


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("chunk_size", [16, None])  # None: chunks from the free memory
def test_compiled_linear_cross_entropy_matches_eager(chunk_size):
    """The fused loss's chunked forward and sliced backward, compiled before any eager call."""
    from gpukernels.backends.triton import linear_cross_entropy

    torch._dynamo.reset()
    linear_cross_entropy._has_mixed_addmm.cache_clear()  # its probe then runs in a compiled function
    h = torch.randn(64, 32, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(1000, 32, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    t = torch.randint(0, 1000, (64,), device="cuda")

    def loss_and_grads(f):
        loss = f(h, w, t)
        return (loss, *torch.autograd.grad(loss, (h, w)))

    def fused(h, w, t):
        return gk.linear_cross_entropy(h, w, t, chunk_size=chunk_size)

    got = loss_and_grads(torch.compile(fused, fullgraph=True))
    torch.testing.assert_close(got, loss_and_grads(fused))


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("run without TRITON_INTERPRET: these checks trace compiled Triton kernels")
    print(json.dumps(_worker()))
