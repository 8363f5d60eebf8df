"""Capture Inductor output code of small graphs, for graph-diff's parser tests.

    python tools/capture_fixtures.py OUT_DIR [--device cuda] [--only CASE,...] [--with-logs]

(Run as a file, it does not import the fusewright package except for the built-in
example case, so it works on a machine whose torch the plugin does not support yet.)

Run on a CUDA machine, it writes real Triton output code (`OUT_DIR/<case>.py`, or
`<case>.<i>.py` when a case compiles several graphs), a `TORCH_LOGS=output_code` log,
a `TORCH_COMPILE_DEBUG` directory, and `manifest.json` (torch/triton versions, device,
and for each case what its kernels are expected to be). The files in
`tests/fixtures/triton/` were made this way; CI parses them without a GPU.

Cases cover what the no-op detector must tell apart: identity copies, a
bf16 -> f32 -> bf16 round trip and a same-dtype copy (no-ops) against a layout copy,
a lossy f32 -> bf16 -> f32 trip, a widening cast and cast-then-compute kernels
(not no-ops); plus reductions (persistent and looped), an extern mm, a Triton mm
template, a user-defined Triton kernel, an opaque custom op, a graph break, dynamic
shapes, and the built-in example with fusewright off and on.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import torch

BF16 = torch.bfloat16


@torch.library.custom_op("fw_fixture::opaque", mutates_args=())
def opaque(x: torch.Tensor) -> torch.Tensor:
    """An op Inductor cannot see into: its input must be materialized."""
    return x * 2


@opaque.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def _rand(*shape, dtype=BF16, device="cuda"):
    return torch.randn(*shape, device=device, dtype=dtype)


# Each case: name -> (fn, make_inputs(device), expected no-op kernel count or None, note).
def identity_clone(x):
    # a clone of a graph input: the output must not alias the input, so Inductor copies
    return x.clone()


def roundtrip_view_into_opaque(x):
    # bf16 -> f32 -> (view) -> bf16 in front of an opaque op: Inductor's own
    # pointless-convert cleanup does not see through the view, so a copy kernel remains
    a = opaque(x)
    return opaque(a.float().view(-1).to(BF16))


def same_dtype_copy(x):
    # `.to(same dtype, copy=True)` of a graph input: a copy kernel
    return x.to(BF16, copy=True)


def layout_copy(x):
    return opaque(opaque(x).t().contiguous())


def lossy_roundtrip(x):
    a = opaque(x)  # f32
    return opaque(a.to(BF16).view(-1).float())


def widening_cast(x):
    return opaque(opaque(x).float())


def cast_then_compute(x):
    a = opaque(x)
    return opaque((a.float() * 2 + 1).to(BF16))


def rms_norm_fp8(x, w):
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    y = w * h.to(BF16)
    amax = y.abs().amax(-1, keepdim=True).float()
    scale = (amax / 448.0).clamp(min=1e-12)
    q = (y.float() / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return q, scale


def mm_extern(a, b):
    return torch.relu(a @ b)


def graph_break(x):
    y = opaque(x).float().view(-1).to(BF16)
    torch._dynamo.graph_break()
    return opaque(y.view(x.shape)) + 1


CASES = {
    "identity_clone": (identity_clone, lambda d: (_rand(64, 256, device=d),), 1, "clone of a graph input"),
    "roundtrip_view_into_opaque": (roundtrip_view_into_opaque, lambda d: (_rand(64, 256, device=d),), 1,
                                   "bf16->f32->view->bf16 before an opaque op"),
    "same_dtype_copy": (same_dtype_copy, lambda d: (_rand(64, 256, device=d),), 1, "copy=True to the same dtype"),
    "layout_copy": (layout_copy, lambda d: (_rand(64, 256, device=d),), 0, "transpose made contiguous"),
    "lossy_roundtrip": (lossy_roundtrip, lambda d: (_rand(64, 256, device=d, dtype=torch.float32),), 0,
                        "f32->bf16->f32 rounds"),
    "widening_cast": (widening_cast, lambda d: (_rand(64, 256, device=d),), 0, "bf16->f32 stored as f32"),
    "cast_then_compute": (cast_then_compute, lambda d: (_rand(64, 256, device=d),), 0, "cast, mul, add, cast"),
    "rms_norm_fp8_persistent": (rms_norm_fp8, lambda d: (_rand(32, 512, device=d), _rand(512, device=d)), 0,
                                "RMSNorm + per-token FP8, short rows"),
    "rms_norm_fp8_looped": (rms_norm_fp8, lambda d: (_rand(8, 32768, device=d), _rand(32768, device=d)), 0,
                            "RMSNorm + per-token FP8, long rows"),
    "mm_extern": (mm_extern, lambda d: (_rand(128, 128, device=d), _rand(128, 128, device=d)), 0, "extern mm"),
    "graph_break": (graph_break, lambda d: (_rand(64, 256, device=d),), None, "two compiled graphs"),
}


def _compile_codes(fn, inputs, fusewright=False, dynamic=None):
    """Inductor's output code for `fn` (fresh Dynamo, no FX graph cache)."""
    from ..testing import compile_and_capture

    return compile_and_capture(fn, inputs, enable=fusewright, dynamic=dynamic).codes


def _write(out: Path, name: str, codes: list[str], manifest: dict, **info) -> None:
    files = []
    for i, code in enumerate(codes):
        fname = f"{name}.py" if len(codes) == 1 else f"{name}.{i}.py"
        (out / fname).write_text(code)
        files.append(fname)
    manifest["cases"][name] = {"files": files, **info}
    print(f"  {name}: {len(codes)} graph(s) -> {', '.join(files)}", flush=True)


def _extra_cases(device: str):
    """Cases that need more than a plain compile: templates, user Triton, dynamic, the example."""
    from torch._inductor import config as inductor_config

    def mm_template(out, manifest):
        a, b = _rand(128, 128, device=device), _rand(128, 128, device=device)
        with inductor_config.patch({"max_autotune_gemm": True, "max_autotune_gemm_backends": "TRITON",
                                    "autotune_in_subproc": False}):
            codes = _compile_codes(mm_extern, (a, b))
        _write(out, "mm_template", codes, manifest, expected_noop=0, note="Triton mm template + relu epilogue")

    def user_triton(out, manifest):
        import triton
        import triton.language as tl

        @triton.jit
        def add_one_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
            offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            mask = offs < n
            tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask) + 1, mask=mask)

        def fn(x):
            y = torch.empty_like(x)
            n = x.numel()
            add_one_kernel[(triton.cdiv(n, 256),)](x, y, n, BLOCK=256)
            return y * 2

        _write(out, "user_triton", _compile_codes(fn, (_rand(64, 256, device=device),)), manifest,
               expected_noop=0, note="user-defined Triton kernel + a pointwise mul")

    def dynamic_roundtrip(out, manifest):
        _write(out, "dynamic_roundtrip", _compile_codes(roundtrip_view_into_opaque, (_rand(64, 256, device=device),),
                                                         dynamic=True),
               manifest, expected_noop=1, note="dynamic shapes: symbolic sizes")

    def example_before_after(out, manifest):
        from fusewright.passes.report import last_report
        from fusewright.tools.example import example

        model, inputs = example(device)
        _write(out, "example_before", _compile_codes(model, inputs), manifest, expected_noop=None,
               note="built-in example, stock Inductor")
        _write(out, "example_after", _compile_codes(model, inputs, fusewright=True), manifest, expected_noop=None,
               note="built-in example, fusewright on", rewrites=last_report().rewrites())

    return {"mm_template": mm_template, "user_triton": user_triton, "dynamic_roundtrip": dynamic_roundtrip,
            "example": example_before_after}


def capture(out: Path, device: str, only: set[str] | None = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    import triton

    manifest = {"torch": torch.__version__, "triton": triton.__version__, "device": device,
                "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                "cases": {}, "failed": {}}
    for name, (fn, make_inputs, expected_noop, note) in CASES.items():
        if only and name not in only:
            continue
        try:
            _write(out, name, _compile_codes(fn, make_inputs(device)), manifest,
                   expected_noop=expected_noop, note=note)
        except Exception:  # one broken case must not lose the others
            manifest["failed"][name] = traceback.format_exc()[-2000:]
            print(f"  {name}: FAILED\n{manifest['failed'][name]}", flush=True)
    for name, run in _extra_cases(device).items():
        if only and name not in only:
            continue
        try:
            run(out, manifest)
        except Exception:
            manifest["failed"][name] = traceback.format_exc()[-2000:]
            print(f"  {name}: FAILED\n{manifest['failed'][name]}", flush=True)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def capture_log_and_debug_dir(out: Path, device: str) -> None:
    """The graph-break case once under TORCH_LOGS=output_code, once under TORCH_COMPILE_DEBUG."""
    cmd = [sys.executable, os.path.abspath(__file__), "--only", "graph_break", "--device", device]
    env = dict(os.environ, TORCH_LOGS="output_code")
    log = subprocess.run(cmd + [str(out / "_scratch_log")], env=env, capture_output=True, text=True, timeout=120)
    (out / "graph_break_output_code.log").write_text(log.stderr)
    debug = out / "debug"
    debug.mkdir(exist_ok=True)
    env = dict(os.environ, TORCH_COMPILE_DEBUG="1", TORCH_COMPILE_DEBUG_DIR=str(debug))
    subprocess.run(cmd + [str(out / "_scratch_debug")], env=env, capture_output=True, text=True, timeout=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", default=None, help="comma-separated case names")
    parser.add_argument("--with-logs", action="store_true", help="also capture a TORCH_LOGS log and a debug dir")
    args = parser.parse_args(argv)
    out = Path(args.out)
    capture(out, args.device, set(args.only.split(",")) if args.only else None)
    if args.with_logs:
        capture_log_and_debug_dir(out, args.device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
