"""Reading Inductor output code: which kernels a compiled graph launches, and what they do.

Output code is the Python module Inductor writes for each compiled graph (what
`TORCH_LOGS=output_code` prints, and `output_code.py` in a `TORCH_COMPILE_DEBUG`
directory). Its top level defines the kernels (`async_compile.triton('name', '''src''')`,
`async_compile.cpp_pybinding([...], '''src''')`); its `call()` launches them in order,
together with extern kernels (`extern_kernels.mm(...)`), aten fallbacks and opaque
custom ops (`torch.ops.ns.op.default(...)`). Each launch is usually preceded by a
comment naming the FX source nodes and the aten ops fused into it.

Finding and reading output code in files, logs and directories, and which rank each
came from (`load_output_codes`, `group_by_rank`, ...), is `output_code_files`.
:class:`OutputCodeError` is what both raise on input that is not output code.

Collectives (`torch.ops._c10d_functional.all_reduce_`, `wait_tensor`, ...) are launches
of kind `collective`; `Kernel.collective` says what they communicate.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import math
import re
from typing import Any

from .kernels import ITEMSIZE, BodyInfo, norm_dtype, read_cpp, read_triton


class OutputCodeError(ValueError):
    """Input that is not Inductor output code (or cannot be read)."""


@dataclasses.dataclass
class Kernel:
    name: str  # as launched in the output code (numbered: triton_poi_fused_add_0)
    kind: str  # triton_pointwise, triton_reduction, triton_persistent_reduction, triton_template,
    #            triton_user, cpp, extern, aten_fallback, custom_op, collective
    ops: list[str]  # aten ops fused into it: from the launch comment, else from the name
    is_noop: bool = False
    noop_reason: str | None = None
    movement: str | None = None  # pure data movement that is not a no-op: "layout copy", "cast bf16->f32"
    body_ops: list[str] = dataclasses.field(default_factory=list)  # operations read from the body
    source_nodes: list[str] = dataclasses.field(default_factory=list)  # FX nodes, from the comment
    bytes: int | None = None  # estimated bytes read + written, where buffer shapes are known
    signature: str = ""  # what it computes (kind + body without names): equal signature, same kernel
    graph: int = 0  # index of the compiled graph (several after graph breaks)
    rank: str | None = None  # tensor-parallel rank whose output code this is ("0", "pid 123"), if known
    # a collective: {"op", "args" (non-tensor arguments as written), "tensors" (shape:dtype of tensor arguments)}
    collective: dict[str, Any] | None = None
    noop_stores: int = 0  # stores that only copy (a C++ kernel can mix copy loops with compute)
    stores: int = 0
    # buffers (alias roots in call(): `buf3 = buf2`, reinterpret_tensor views) read and written;
    # they link kernels into a dataflow graph (render.kernel_graph)
    reads: list[str] = dataclasses.field(default_factory=list)
    writes: list[str] = dataclasses.field(default_factory=list)
    source: str = dataclasses.field(default="", repr=False)  # the kernel's code, for --show

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "kind": self.kind, "is_noop": self.is_noop,
            "noop_reason": self.noop_reason, "movement": self.movement, "ops": self.ops,
            "body_ops": self.body_ops, "source_nodes": self.source_nodes, "bytes": self.bytes,
            "signature": self.signature, "graph": self.graph, "rank": self.rank,
            "collective": self.collective,
        }

    @property
    def short_kind(self) -> str:
        return self.kind.replace("triton_persistent_reduction", "triton_persistent").replace("triton_", "")


@dataclasses.dataclass
class OutputCode:
    """One compiled graph's output code and the kernels it launches."""

    code: str
    kernels: list[Kernel]
    label: str = ""  # where it came from: a path, "graph 0"
    inputs: list[str] = dataclasses.field(default_factory=list)  # graph inputs (arg0_1, ...)
    outputs: list[str] = dataclasses.field(default_factory=list)  # alias roots of what call() returns
    rank: str | None = None  # tensor-parallel rank, where the source says (see output_code_files)

    def set_rank(self, rank: str | None, graph: int | None = None) -> "OutputCode":
        self.rank = rank
        for k in self.kernels:
            k.rank = rank
            if graph is not None:
                k.graph = graph
        return self

    def summary(self) -> dict[str, Any]:
        return summarize(self.kernels)


def summarize(kernels: list[Kernel]) -> dict[str, Any]:
    return {
        "kernel_count": len(kernels),
        "noop_kernel_count": sum(k.is_noop for k in kernels),
        "collective_count": sum(k.kind == "collective" for k in kernels),
        "kernels": [k.to_dict() for k in kernels],
    }


# ----------------------------------------------------------------------------- op names
_ORIGIN = re.compile(r"#\s*(?:Topologically Sorted )?Source Nodes:\s*\[(.*?)\],\s*Original ATen:\s*\[(.*?)\]")
_known_ops: set[str] | None = None


def _op_vocabulary() -> set[str]:
    global _known_ops
    if _known_ops is None:
        try:
            import torch

            _known_ops = {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if "::" in n}
        except Exception:  # an internal API: without it, names split on underscores
            _known_ops = set()
    return _known_ops


def ops_from_name(name: str) -> list[str]:
    """`triton_poi_fused__to_copy_add_mul_3` -> ["_to_copy", "add", "mul"]."""
    tail = name.split("fused_", 1)[1] if "fused_" in name else ""
    tail = re.sub(r"_\d+$", "", tail)
    if not tail:
        return []
    parts = tail.split("_")
    vocab = _op_vocabulary()
    # segment the parts into known op names, longest first; an unknown part stands alone
    out, i = [], 0
    while i < len(parts):
        for j in range(len(parts), i, -1):
            cand = "_".join(parts[i:j])
            if cand in vocab and cand:
                out.append(cand)
                i = j
                break
        else:
            if parts[i]:
                out.append(parts[i])
            i += 1
    return out


def _aten_list(text: str) -> list[str]:
    return [op.strip().split(".")[-1] if op.strip().startswith("aten.") else op.strip()
            for op in text.split(",") if op.strip()]


# ----------------------------------------------------------------------------- shapes
def _eval_int(node: ast.AST, symbols: dict[str, int]) -> int | None:
    try:
        value = eval(compile(ast.Expression(node), "<shape>", "eval"), {"__builtins__": {}}, dict(symbols))
    except Exception:
        return None
    return int(value) if isinstance(value, (int, float)) else None


def _shape(node: ast.AST, symbols: dict[str, int]) -> tuple[int, ...] | None:
    if not isinstance(node, (ast.Tuple, ast.List)):
        return None
    dims = [_eval_int(e, symbols) for e in node.elts]
    return None if any(d is None for d in dims) else tuple(dims)  # type: ignore[return-value]


@dataclasses.dataclass
class _Buf:
    shape: tuple[int, ...] | None
    dtype: str | None

    @property
    def numel(self) -> int | None:
        return None if self.shape is None else math.prod(self.shape)


class _Buffers:
    """Shapes and dtypes of the buffers in `call()`, as far as the code states them."""

    def __init__(self) -> None:
        self.bufs: dict[str, _Buf] = {}
        self.symbols: dict[str, int] = {}
        self.alias: dict[str, str] = {}

    def root(self, node: ast.AST) -> str | None:
        """The buffer an argument refers to, through aliases and reinterpret_tensor views."""
        if isinstance(node, ast.Call) and _dotted(node.func) == "reinterpret_tensor" and node.args:
            return self.root(node.args[0])
        if isinstance(node, ast.Name) and (node.id in self.bufs or node.id in self.alias):
            name = node.id
            while name in self.alias and self.alias[name] != name:
                name = self.alias[name]
            return name
        return None

    def of(self, node: ast.AST) -> _Buf | None:
        if isinstance(node, ast.Name):
            return self.bufs.get(node.id)
        if isinstance(node, ast.Call) and _dotted(node.func) == "reinterpret_tensor" and len(node.args) >= 2:
            base = self.of(node.args[0])
            return _Buf(_shape(node.args[1], self.symbols), base.dtype if base else None)
        return None

    def assign(self, name: str, value: ast.AST) -> None:
        root = self.root(value)
        if root is not None and root != name:
            self.alias[name] = root
        if isinstance(value, ast.Name):
            if value.id in self.bufs:
                self.bufs[name] = self.bufs[value.id]
            elif value.id in self.symbols:
                self.symbols[name] = self.symbols[value.id]
            return
        if isinstance(value, ast.Constant) and isinstance(value.value, int):
            self.symbols[name] = value.value
            return
        if isinstance(value, ast.BinOp):
            v = _eval_int(value, self.symbols)
            if v is not None:
                self.symbols[name] = v
            return
        if not isinstance(value, ast.Call):
            return
        func = _dotted(value.func) or ""
        if func.startswith("empty_strided") or func == "rand_strided":
            dtype = None
            for kw in value.keywords:
                if kw.arg == "dtype":
                    dtype = norm_dtype(_dotted(kw.value))
            if dtype is None and len(value.args) >= 3:
                dtype = norm_dtype(_dotted(value.args[2]))
            self.bufs[name] = _Buf(_shape(value.args[0], self.symbols) if value.args else None, dtype)
        elif func == "reinterpret_tensor":
            buf = self.of(value)
            if buf:
                self.bufs[name] = buf

    def asserted(self, call: ast.Call) -> None:
        """`assert_size_stride(buf, (shape), (stride))` states a shape."""
        if len(call.args) >= 2 and isinstance(call.args[0], ast.Name):
            name = call.args[0].id
            shape = _shape(call.args[1], self.symbols)
            old = self.bufs.get(name)
            self.bufs[name] = _Buf(shape, old.dtype if old else None)

    def bytes_of(self, args: list[ast.AST], param_dtypes: list[str | None] | None = None,
                 param_names: list[str] | None = None) -> int | None:
        """Bytes read + written by a launch: each distinct tensor argument touched once
        (twice for an in-place `in_out_ptr`). None when a tensor argument's size is unknown."""
        total, seen, known = 0, set(), False
        for i, arg in enumerate(args):
            buf = self.of(arg)
            key = ast.unparse(arg)
            if buf is None or key in seen:
                if buf is None and param_dtypes is not None and i < len(param_dtypes) and param_dtypes[i]:
                    return None  # a pointer parameter whose buffer we cannot size
                continue
            seen.add(key)
            dtype = (param_dtypes[i] if param_dtypes and i < len(param_dtypes) and param_dtypes[i]
                     else buf.dtype)
            if buf.numel is None or dtype is None:
                return None
            times = 2 if param_names and i < len(param_names) and param_names[i].startswith("in_out_ptr") else 1
            total += buf.numel * ITEMSIZE[dtype] * times
            known = True
        return total if known else None


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


# ----------------------------------------------------------------------------- parsing
@dataclasses.dataclass
class _KernelDef:
    name: str
    backend: str  # triton / cpp
    source: str
    kind: str
    info: BodyInfo | None


def _kernel_defs(tree: ast.Module) -> dict[str, _KernelDef]:
    defs = {}
    for stmt in tree.body:
        if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)
                and isinstance(stmt.value, ast.Call)):
            continue
        var, func = stmt.targets[0].id, _dotted(stmt.value.func) or ""
        strings = [a.value for a in stmt.value.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
        if not func.startswith("async_compile.") or not strings:
            continue
        method = func.split(".", 1)[1]
        source = max(strings, key=len)
        if method == "triton":
            kind, info = read_triton(source, var)
            defs[var] = _KernelDef(var, "triton", source, kind, info)
        elif method.startswith("cpp"):
            defs[var] = _KernelDef(var, "cpp", source, "cpp", read_cpp(source))
        else:  # cuda / rocm / halide / mps ...: launched like the others, not read
            defs[var] = _KernelDef(var, method, source, method, None)
    return defs


_NOT_KERNELS = {"_alloc_from_pool", "resize_storage_bytes_", "set_", "record_stream"}
# namespaces of torch.distributed's ops as Inductor output code calls them
COLLECTIVE_NAMESPACES = ("_c10d_functional", "_c10d_functional_autograd", "c10d_functional", "c10d", "_dtensor",
                         "symm_mem")
# collectives that write into their (first) tensor argument instead of returning a new buffer
_IN_PLACE_COLLECTIVES = ("all_reduce_", "all_reduce_coalesced_", "wait_tensor", "broadcast_")


def _launch_target(call: ast.Call, defs: dict[str, _KernelDef]) -> tuple[str, str, str] | None:
    """(kind, name, call form) of a call in `call()` that launches work, else None."""
    func = call.func
    if isinstance(func, ast.Attribute) and func.attr == "run" and isinstance(func.value, ast.Name):
        if func.value.id in defs:
            return defs[func.value.id].kind, func.value.id, "run"
    if isinstance(func, ast.Name) and func.id in defs:
        return defs[func.id].kind, func.id, "call"
    name = _dotted(func) or ""
    if name.startswith("extern_kernels."):
        op = name.split(".", 1)[1]
        if any(ns in op for ns in COLLECTIVE_NAMESPACES) or op.split(".")[0] in _COLLECTIVE_OPS:
            return "collective", op, "op"  # never an extern matmul: a collective however it is spelled
        return "extern", op, "extern"
    parts = name.split(".")
    if name.startswith("torch.ops.") and len(parts) >= 4:
        ns, op = parts[2], parts[3]
        qual = f"{ns}.{op}"
    elif parts[0] in ("aten", "prims") and len(parts) >= 2:
        ns, op = parts[0], parts[1]
        qual = f"{ns}.{op}"
    else:
        return None
    if op in _NOT_KERNELS or ns == "inductor" and op.startswith("_"):
        return None
    if ns in ("aten", "prims"):
        return "aten_fallback", qual, "op"
    if ns in COLLECTIVE_NAMESPACES:
        return "collective", qual, "op"
    return "custom_op", qual, "op"


_COLLECTIVE_OPS = {"all_reduce", "all_reduce_", "wait_tensor", "reduce_scatter_tensor", "all_gather_into_tensor",
                   "all_gather_into_tensor_out", "all_to_all_single", "broadcast", "broadcast_",
                   "all_reduce_coalesced", "all_reduce_coalesced_", "all_gather_into_tensor_coalesced",
                   "reduce_scatter_tensor_coalesced"}


def _call_functions(tree: ast.Module) -> list[ast.FunctionDef]:
    """`call` (module level or Runner.call) and cudagraph partitions, in source order."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and (node.name == "call" or re.fullmatch(r"partition_\d+", node.name)):
            found.append(node)
    return sorted(found, key=lambda n: n.lineno)


def _statements(body: list[ast.stmt]):
    for stmt in body:
        if isinstance(stmt, (ast.With, ast.If, ast.For)):
            yield from _statements(stmt.body)
            yield from _statements(getattr(stmt, "orelse", []))
        else:
            yield stmt


def _looks_like_output_code(code: str) -> bool:
    return "def call(" in code and ("async_compile" in code or "AOT ID" in code or "extern_kernels" in code)


def parse_output_code(code: str, label: str = "", graph: int = 0) -> OutputCode:
    """Parse one output-code module. Raises OutputCodeError if it is not one."""
    if not _looks_like_output_code(code):
        raise OutputCodeError(f"{label or 'input'}: not Inductor output code (no `def call(` with "
                              "async_compile/extern_kernels)")
    try:
        tree = ast.parse(code)
    except SyntaxError as exc:
        raise OutputCodeError(f"{label or 'input'}: not valid output code: {exc.msg} at line {exc.lineno}") from None
    lines = code.splitlines()
    defs = _kernel_defs(tree)
    buffers = _Buffers()
    for func in (n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "get_args"):
        for stmt in _statements(func.body):  # example inputs: shapes, dtypes, symbol values
            if isinstance(stmt, ast.Assign) and isinstance(stmt.targets[0], ast.Name):
                buffers.assign(stmt.targets[0].id, stmt.value)
    kernels: list[Kernel] = []
    inputs: list[str] = []
    outputs: list[str] = []
    prev_line = 0
    for func in _call_functions(tree):
        for stmt in _statements(func.body):
            call = stmt.value if isinstance(stmt, (ast.Expr, ast.Assign)) else None
            target = None
            if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
                target = stmt.targets[0].id
                launch = _launch_target(stmt.value, defs) if isinstance(stmt.value, ast.Call) else None
                if launch is None:
                    buffers.assign(target, stmt.value)
            elif (isinstance(stmt, ast.Assign) and isinstance(stmt.targets[0], ast.Tuple)
                  and isinstance(stmt.value, ast.Name) and stmt.value.id == "args" and func.name == "call"):
                inputs = [e.id for e in stmt.targets[0].elts if isinstance(e, ast.Name)]  # `arg0_1, arg1_1 = args`
                for name in inputs:
                    buffers.alias.setdefault(name, name)
            elif isinstance(stmt, ast.Return) and isinstance(stmt.value, ast.Tuple) and func.name == "call":
                outputs = [r for r in (buffers.root(e) for e in stmt.value.elts) if r]
            if not isinstance(call, ast.Call):
                continue
            if _dotted(call.func) == "assert_size_stride":
                buffers.asserted(call)
                continue
            launch = _launch_target(call, defs)
            if launch is None:
                continue
            kind, name, form = launch
            comment = None
            for line in lines[prev_line:stmt.lineno - 1]:
                m = _ORIGIN.search(line)
                if m:
                    comment = m
            prev_line = stmt.lineno
            kernel = _make_kernel(kind, name, form, call, defs, buffers, comment, graph)
            _dataflow(kernel, form, call, defs, buffers, target)
            kernels.append(kernel)
    return OutputCode(code, kernels, label, inputs, outputs)


def _dataflow(kernel: Kernel, form: str, call: ast.Call, defs, buffers: _Buffers, target: str | None) -> None:
    """Which buffers a launch reads and writes, from parameter names where the kernel has them."""
    if target is not None:  # `buf0 = torch.ops.ns.op.default(...)`: a new buffer
        buffers.alias[target] = target
        kernel.writes.append(target)
    if kernel.kind == "collective" and call.args and kernel.ops and kernel.ops[0] in _IN_PLACE_COLLECTIVES:
        root = buffers.root(call.args[0])  # all_reduce_ and wait_tensor (re)define their buffer
        if root is not None:
            kernel.writes.append(root)
    params: list[str] = []
    if form in ("run", "call") and defs[kernel.name].info is not None:
        params = list(defs[kernel.name].info.params)
    for i, arg in enumerate(call.args):
        root = buffers.root(arg)
        if root is None:
            continue
        param = params[i] if i < len(params) else ""
        if param.startswith(("in_out_ptr", "out_ptr")):
            kernel.writes.append(root)
            if param.startswith("in_out_ptr"):
                kernel.reads.append(root)
        elif param.startswith(("in_ptr", "arg_")) or form in ("op", "extern"):
            kernel.reads.append(root)
        else:  # a user kernel's parameters do not say which are written
            kernel.reads.append(root)
            kernel.writes.append(root)
    for kw in call.keywords:
        root = buffers.root(kw.value)
        if root is not None:
            (kernel.writes if kw.arg == "out" else kernel.reads).append(root)


def _make_kernel(kind, name, form, call, defs, buffers, comment, graph) -> Kernel:
    source_nodes = [s.strip() for s in comment.group(1).split(",") if s.strip()] if comment else []
    aten_ops = _aten_list(comment.group(2)) if comment else []
    if form in ("run", "call"):
        # the comment also names the opaque op a generated kernel feeds: keep aten ops only
        aten_ops = [op for op in aten_ops if "." not in op]
    else:
        aten_ops = [name.split(".")[-1] if kind != "custom_op" else name]
    kernel = Kernel(name=name, kind=kind, ops=aten_ops, source_nodes=source_nodes, graph=graph)
    args = [a for a in call.args]
    out_kw = [kw.value for kw in call.keywords if kw.arg == "out"]
    if form in ("run", "call"):
        d = defs[name]
        info = d.info
        kernel.source = d.source.strip("\n")
        if not kernel.ops:
            kernel.ops = ops_from_name(name)
        if info is not None:
            kernel.is_noop = info.is_noop
            kernel.noop_reason = info.noop_reason
            kernel.movement = info.movement
            kernel.body_ops = info.body_ops
            kernel.signature = info.signature(kind)
            kernel.noop_stores, kernel.stores = info.noop_stores, len(info.stores)
            names = list(info.params)
            dtypes = list(info.params.values())
            kernel.bytes = buffers.bytes_of(args[:len(names)], dtypes, names)
        else:
            kernel.signature = hashlib.sha1(f"{kind}\n{d.source}".encode()).hexdigest()[:12]
    else:
        if not kernel.ops:
            kernel.ops = [name.split(".")[-1]]
        shapes = []
        for arg in args + out_kw:
            buf = buffers.of(arg)
            shapes.append(f"{buf.shape}:{buf.dtype}" if buf else "?")
        kernel.signature = hashlib.sha1(f"{kind}\n{name}\n{shapes}".encode()).hexdigest()[:12]
        kernel.bytes = buffers.bytes_of(args + out_kw)
        if kind == "collective":
            consts = [ast.unparse(a) for a in args if buffers.of(a) is None and buffers.root(a) is None]
            consts += [f"{kw.arg}={ast.unparse(kw.value)}" for kw in call.keywords if kw.arg != "out"]
            tensors = []
            for a in args + out_kw:
                buf = buffers.of(a)
                if buf is not None or buffers.root(a):
                    shape = "?" if buf is None or buf.shape is None else str(buf.shape)
                    tensors.append(f"{shape}:{(buf.dtype if buf else None) or '?'}")
            kernel.collective = {"op": name.split(".")[-1], "args": consts, "tensors": tensors}
            kernel.signature = hashlib.sha1(f"{kind}\n{name}\n{consts}\n{tensors}".encode()).hexdigest()[:12]
    return kernel


def parse_kernels(code: str) -> list[Kernel]:
    """The kernels one output-code module launches, in launch order."""
    return parse_output_code(code).kernels

