"""Reading Inductor output code: which kernels a compiled graph launches.

Output code is the Python module Inductor writes for each compiled graph (what
`TORCH_LOGS=output_code` prints). Its `call()` function launches the kernels in order:
`triton_poi_fused_...run(...)`, `cpp_fused_...(...)`, `extern_kernels.mm(...)`,
`torch.ops.lib.op.default(...)`.
"""

from __future__ import annotations

import dataclasses
import re


@dataclasses.dataclass
class Kernel:
    name: str
    kind: str  # triton_pointwise, triton_reduction, triton_persistent_reduction, cpp, extern, custom_op, ...
    ops: list[str]  # the ops fused into it, read from its name
    is_noop: bool = False

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "ops": self.ops, "is_noop": self.is_noop}


_TRITON_KIND = {"poi": "triton_pointwise", "red": "triton_reduction", "per": "triton_persistent_reduction",
                "tem": "triton_template"}
_LAUNCH = re.compile(
    r"^\s*(?:(?P<triton>triton_(?P<tk>poi|red|per|tem)_\w+)\.run\("
    r"|(?P<cpp>cpp_fused_\w+)\("
    r"|extern_kernels\.(?P<extern>\w+)\("
    r"|torch\.ops\.(?P<custom>\w+\.\w+)(?:\.\w+)?\()",
    re.M,
)


def _fused_ops(name: str) -> list[str]:
    tail = name.split("fused_", 1)[1] if "fused_" in name else name
    tail = re.sub(r"_\d+$", "", tail)
    return [op for op in tail.split("_") if op]


def _call_body(code: str) -> str:
    """The body of `call()`, where launches happen (kernel definitions are skipped)."""
    start = code.find("def call(")
    return code[start:] if start >= 0 else code


def parse_kernels(code: str) -> list[Kernel]:
    kernels = []
    for m in _LAUNCH.finditer(_call_body(code)):
        if m.group("triton"):
            name = m.group("triton")
            kernels.append(Kernel(name, _TRITON_KIND[m.group("tk")], _fused_ops(name)))
        elif m.group("cpp"):
            name = m.group("cpp")
            kernels.append(Kernel(name, "cpp", _fused_ops(name)))
        elif m.group("extern"):
            kernels.append(Kernel(m.group("extern"), "extern", [m.group("extern")]))
        elif m.group("custom"):
            name = m.group("custom")
            kernels.append(Kernel(name, "custom_op", [name.split(".")[-1]]))
    return kernels
