"""The occupancy rules (backends/triton/_occupancy.py) against cases worked by hand
from the CUDA occupancy calculator's rules, on sm_90's limits, and ci/compile_sm90.py's
reading of ptxas's report."""

import importlib.util
from pathlib import Path

import pytest

from gpukernels.backends.triton._occupancy import programs_per_sm

_SPEC = importlib.util.spec_from_file_location(
    "compile_sm90", Path(__file__).resolve().parent.parent / "ci" / "compile_sm90.py"
)
compile_sm90 = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(compile_sm90)


@pytest.mark.parametrize(
    "registers, threads, shared, expected",
    [
        # 84 * 32 = 2688 -> 2816 a warp; 16384 per sub-partition / 2816 = 5 warps, 20 an SM: one 16-warp block
        (84, 512, 0, (1, "registers")),
        # 1024 a warp: 16 warps a sub-partition, 64 an SM, as many as the 2048 threads allow (threads come first)
        (32, 256, 0, (8, "threads")),
        # 40 * 32 = 1280 exactly: 12 warps a sub-partition, 48 an SM, 6 blocks of 8 warps (threads: 8)
        (40, 256, 0, (6, "registers")),
        # one warp a block: the 32-block limit before the 64 warps' worth of threads
        (16, 32, 0, (32, "blocks")),
        # 113 KB + the reserved 1 KB = 114 KB: two fit in 228 KB; 114 KB + 1 KB do not
        (32, 128, 113 * 1024, (2, "shared memory")),
        (32, 128, 114 * 1024, (1, "shared memory")),
        # 48 KB + 1 KB = 50176 bytes: 233472 // 50176 = 4
        (32, 128, 48 * 1024, (4, "shared memory")),
        # 227 KB is the most a block may have; one byte more cannot launch
        (32, 128, 227 * 1024, (1, "shared memory")),
        (32, 128, 227 * 1024 + 1, (0, "cannot launch")),
        # 255 * 32 -> 8192 a warp, times 32 warps = 262144 > 65536 registers a block
        (255, 1024, 0, (0, "cannot launch")),
        (32, 2048, 0, (0, "cannot launch")),
        # 128 registers at 512 threads: exactly the register file, one block
        (128, 512, 0, (1, "registers")),
    ],
)
def test_programs_per_sm_matches_hand_worked_cases(registers, threads, shared, expected):
    assert programs_per_sm(registers, threads, shared) == expected


def test_ptxas_usage_reads_registers_spills_and_static_shared_memory():
    log = (
        "ptxas info    : 0 bytes gmem\n"
        "ptxas info    : Compiling entry function 'norm_bwd_kernel' for 'sm_90a'\n"
        "ptxas info    : Function properties for norm_bwd_kernel\n"
        "    8 bytes stack frame, 12 bytes spill stores, 20 bytes spill loads\n"
        "ptxas info    : Used 128 registers, used 1 barriers, 16 bytes smem, 400 bytes cmem[0]\n"
    )
    assert compile_sm90.ptxas_usage(log) == {"registers": 128, "spill_bytes": 32, "static_shared": 16}
    with pytest.raises(RuntimeError, match="register count"):
        compile_sm90.ptxas_usage("ptxas info    : 0 bytes gmem\n")


def test_a_spill_fails_unless_the_allow_list_names_the_variant():
    row = {
        "kernel": "norm_bwd_kernel",
        "variant": "CAST_BEFORE_W=False BLOCK_D=4096 ONE_BLOCK=True",
        "shape": "bf16 [4, 4096]",
    }
    assert not compile_sm90.spill_allowed(row)
    assert compile_sm90.spill_allowed({**row, "variant": "CAST_BEFORE_W=False BLOCK_D=8192 ONE_BLOCK=False"})
    assert not compile_sm90.spill_allowed({**row, "variant": "CAST_BEFORE_W=False BLOCK_D=8192 ONE_BLOCK=True"})
    assert not compile_sm90.spill_allowed({**row, "kernel": "norm_fwd_kernel", "variant": "BLOCK_D=8192"})


def test_report_fails_on_a_failure_or_a_spill_not_allowed(tmp_path, capsys):
    """The workers' outcomes merged: the table (into --out too), each failure printed, exit 1 if any."""
    row = {
        "kernel": "norm_bwd_kernel",
        "variant": "CAST_BEFORE_W=False BLOCK_D=4096 ONE_BLOCK=True",
        "shape": "bf16 [4, 4096]",
        "threads": 256,
        "registers": 64,
        "spill_bytes": 0,
        "shared": 0,
        "programs": 4,
        "limiter": "registers",
        "grid": None,
        "below_grid": False,
    }
    table = tmp_path / "occupancy.md"
    assert compile_sm90.report([], [row], table) == 0
    assert "| norm_bwd_kernel |" in table.read_text() and "FAILED" not in capsys.readouterr().out
    assert compile_sm90.report(["compile worker 1 exited with -9 before its report"], [row], None) == 1
    assert "FAILED compile worker 1" in capsys.readouterr().out
    assert compile_sm90.report([], [{**row, "spill_bytes": 8}], None) == 1
    assert "spills 8 bytes" in capsys.readouterr().out


def test_arguments_are_recorded_as_the_jit_specializes_them():
    """The compile check compiles what a GPU launch would: aligned pointers and ints
    divisible by 16 marked so (vectorised loads), an int equal to 1 a constant, the
    kernel's do_not_specialize lists honoured."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction

    def body(X, n, one, skipped, scale):
        pass

    kernel = JITFunction(body, do_not_specialize=["skipped"])  # as the recording makes it from the interpreter's
    backend = make_backend(GPUTarget("cuda", 90, 32))
    x = torch.zeros(64, dtype=torch.bfloat16)

    def spec(name, value):
        return compile_sm90._specialization(kernel.params[kernel.arg_names.index(name)], value, backend)

    assert spec("X", x) == ["type", "*bf16", "D"]
    assert spec("X", x[1:]) == ["type", "*bf16", ""]
    assert spec("n", 4096) == ["type", "i32", "D"] and spec("n", 4097) == ["type", "i32", ""]
    assert spec("one", 1) == ["constexpr", 1]
    assert spec("skipped", 4096) == ["type", "i32", ""]
    assert spec("scale", 0.5) == ["type", "fp32", ""]
