"""Compile the project's Triton kernels for an NVIDIA GPU on a machine that has none.

The CPU CI runs the kernels under Triton's interpreter, which checks their arithmetic but
never compiles them: a construct the interpreter accepts and the GPU compiler rejects, a
loop the software pipeliner no longer pipelines, or a plan that spills registers would
go unnoticed until a GPU run. Triton compiles ahead of time for any target it has a
backend for (the CUDA backend and its ptxas ship in the triton wheel, also in CPU-only
installs), so these checks need no GPU:

    with compile_only(arch=90):
        kernel = CompileOnly(norm_quant_triton._rms_norm_quant_kernel)
        norm_quant_triton._rms_norm_quant_kernel = kernel  # what launch() calls
        norm_quant_triton.launch(spec, x, w)  # CPU tensors: compiles, launches nothing
        resources(kernel.last)  # registers, spills, shared memory, async copies

`compile_only` makes a stand-in the active Triton driver: it names the target and device
0, and has no launcher, so only `JITFunction.warmup` (compile, no launch) works under it.
Run it in a process of its own: Triton caches the target per JIT function and device.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile

import torch


class _TargetOnlyDriver:
    """What `JITFunction.warmup` asks of the active driver: device, stream and target."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def is_active(self) -> bool:
        return True

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


@contextlib.contextmanager
def compile_only(arch: int = 90):
    """Within the block, Triton compiles for sm_`arch` (CUDA) and cannot launch."""
    from triton.runtime import driver

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("compile_only() compiles for a GPU: unset TRITON_INTERPRET (the interpreter "
                           "never compiles)")
    # the previous active driver, put back as it was: `reset_active()` would create the
    # default driver, which fails on a machine without a GPU
    saved = getattr(driver, "_active", None)
    driver.set_active(_TargetOnlyDriver(arch))
    try:
        yield
    finally:
        driver.set_active(saved)


class CompileOnly:
    """Stands in for a `@triton.jit` kernel at its launch site: `kernel[grid](*args, **kw)`
    compiles for the active target (`compile_only`) and returns the compiled kernel without
    launching it; `last` is the most recent one."""

    def __init__(self, fn):
        self.fn = fn
        self.last = None

    def __getitem__(self, grid):
        def compile_for(*args, **kwargs):
            self.last = self.fn.warmup(*args, grid=grid, **kwargs)
            return self.last

        return compile_for


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def resources(compiled) -> dict:
    """Registers, spill stores/local memory and static shared memory per thread block (from
    `cuobjdump --dump-resource-usage` on the cubin, the numbers the driver reports on a GPU),
    Triton's shared-memory allocation, and what the PTX issues: asynchronous copies
    (`cp.async`, what the software pipeliner emits for a pipelined load), bulk/TMA copies,
    plain global loads, conversions and barriers, and the layout conversions of the TTGIR."""
    ptx = compiled.asm["ptx"]
    ttgir = compiled.asm["ttgir"] if "ttgir" in compiled.asm else ""
    out = dict(shared=int(compiled.metadata.shared), num_warps=int(compiled.metadata.num_warps),
               cp_async=len(re.findall(r"\bcp\.async\.c[ag]\b", ptx)),
               cp_async_bulk=len(re.findall(r"\bcp\.async\.bulk\b", ptx)),
               ld_global=len(re.findall(r"\bld\.global\b", ptx)),
               # f32 -> fp8 e4m3 conversions, and how many saturate (the norm-quant kernel
               # leaves its +-448 clamp to them)
               cvt_e4m3=len(re.findall(r"\bcvt\.[\w.]*e4m3", ptx)),
               cvt_e4m3_satfinite=len(re.findall(r"\bcvt\.rn\.satfinite\.e4m3x2\.f32\b", ptx)),
               # f32 -> int8: the one saturating round-to-nearest conversion the norm-quant
               # kernel uses for the int8 range, and truncating ones (a rint-clamp-convert path)
               cvt_s8_rni_sat=len(re.findall(r"\bcvt\.rni\.sat\.s8\.f32\b", ptx)),
               cvt_rzi_int=len(re.findall(r"\bcvt\.rzi\.[su]\d+\.f32\b", ptx)),
               # the in-range int8 conversion's rint, RN(t + 1.5 * 2^23): as add.rn (never
               # contracted into an fma with the scaling before it), and every use of the constant
               rint_add_rn=len(re.findall(r"\badd\.rn\.f32\s[^;]*0f4B400000", ptx)),
               rint_magic=len(re.findall(r"0f4B400000", ptx)),
               # layout conversions Triton kept (each a round trip through shared memory
               # between two block barriers) and the block barriers of the PTX
               layout_converts=len(re.findall(r"\bttg\.convert_layout\b", ttgir)),
               bar_sync=len(re.findall(r"\b(?:bar|barrier)\.sync\b", ptx)))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        try:
            text = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", path], capture_output=True,
                                  text=True, timeout=60).stdout
        except OSError:
            text = ""
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if m:
        out.update(regs=int(m.group(1)), stack=int(m.group(2)), static_shared=int(m.group(3)),
                   local=int(m.group(4)))
    return out


def resident_programs(res: dict, regs_per_sm: int = 65536, smem_per_sm: int = 233472,
                      threads_per_sm: int = 2048, blocks_per_sm: int = 32) -> int:
    """Programs of a compiled kernel that fit on one SM at once (H100 limits by default):
    registers are allocated per warp in units of 256, shared memory per block with 1 KB
    reserved for the system. What a persistent plan's programs per SM must not exceed,
    or its last programs start only when others finish."""
    warps = res["num_warps"]
    regs_per_warp = -(-res["regs"] * 32 // 256) * 256
    by_regs = (regs_per_sm // regs_per_warp) // warps if regs_per_warp else blocks_per_sm
    by_smem = smem_per_sm // (res["shared"] + 1024)
    by_threads = threads_per_sm // (32 * warps)
    return max(0, min(by_regs, by_smem, by_threads, blocks_per_sm))
