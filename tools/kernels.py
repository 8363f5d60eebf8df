"""What one generated kernel does, read from its source: kind, body ops, no-op detection.

A kernel is a **no-op** when every value it stores is a value it loaded from the same
element of some buffer, passed only through dtype conversions that lose nothing on the
way back to the dtype it started in: an identity copy, a bf16 -> f32 -> bf16 round
trip, a same-dtype copy, or an in-place kernel that writes back what it read. Such a
kernel moves bytes and computes nothing; it exists only because a graph asked for a
cast or a copy that a rewrite could have dropped.

Not no-ops: a kernel that computes anything, a cast that changes the stored dtype
(bf16 -> f32 stored as f32 is a real widening), a lossy trip (f32 -> bf16 -> f32
rounds), and a layout copy (the store index differs from the load index: a transpose
made contiguous). The last two are reported as data movement (`movement`), because a
person may still want to look at them.

Both backends are read the same way: collect the single-assignment definitions of the
kernel body in order, then trace each stored value back through aliases and casts.
Triton bodies are Python and go through `ast`; C++ bodies are read line by line (each
statement Inductor emits sits on one line).
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import hashlib
import re
import struct
from typing import Iterable

# ----------------------------------------------------------------------------- dtypes
_DTYPE_ALIASES = {
    # Triton signature strings and tl.* names
    "bf16": "bf16", "bfloat16": "bf16", "fp16": "f16", "float16": "f16", "fp32": "f32", "float32": "f32",
    "fp64": "f64", "float64": "f64", "i1": "bool", "int1": "bool", "i8": "i8", "int8": "i8", "i16": "i16",
    "int16": "i16", "i32": "i32", "int32": "i32", "i64": "i64", "int64": "i64", "u8": "u8", "uint8": "u8",
    "fp8e4nv": "f8e4m3", "float8e4nv": "f8e4m3", "fp8e5": "f8e5m2", "float8e5": "f8e5m2",
    "fp8e4b15": "f8e4b15", "float8e4b15": "f8e4b15",
    # C++ names
    "float": "f32", "double": "f64", "at::BFloat16": "bf16", "c10::BFloat16": "bf16", "at::Half": "f16",
    "c10::Half": "f16", "half": "f16", "int64_t": "i64", "int32_t": "i32", "int16_t": "i16",
    "int8_t": "i8", "uint8_t": "u8", "bool": "bool", "at::Float8_e4m3fn": "f8e4m3",
    "at::Float8_e5m2": "f8e5m2", "c10::Float8_e4m3fn": "f8e4m3", "c10::Float8_e5m2": "f8e5m2",
    "long": "i64", "int": "i32",
    # torch names (output-code allocations)
    "torch.bfloat16": "bf16", "torch.float16": "f16", "torch.float32": "f32", "torch.float64": "f64",
    "torch.bool": "bool", "torch.int8": "i8", "torch.int16": "i16", "torch.int32": "i32",
    "torch.int64": "i64", "torch.uint8": "u8", "torch.float8_e4m3fn": "f8e4m3", "torch.float8_e5m2": "f8e5m2",
    "torch.float": "f32", "torch.half": "f16", "torch.long": "i64", "torch.int": "i32",
}

ITEMSIZE = {"bool": 1, "i8": 1, "u8": 1, "f8e4m3": 1, "f8e5m2": 1, "f8e4b15": 1, "i16": 2, "f16": 2,
            "bf16": 2, "i32": 4, "f32": 4, "i64": 8, "f64": 8}

# dtype -> the dtypes that hold every one of its values exactly (besides itself)
_HOLDS = {
    "bool": set(ITEMSIZE),
    "u8": {"i16", "i32", "i64", "f16", "bf16", "f32", "f64"},
    "i8": {"i16", "i32", "i64", "f16", "bf16", "f32", "f64"},
    "i16": {"i32", "i64", "f32", "f64"},
    "i32": {"i64", "f64"},
    "f8e4m3": {"f16", "bf16", "f32", "f64"},
    "f8e5m2": {"f16", "bf16", "f32", "f64"},
    "bf16": {"f32", "f64"},
    "f16": {"f32", "f64"},
    "f32": {"f64"},
}


def norm_dtype(name: str | None) -> str | None:
    if name is None:
        return None
    name = name.strip().lstrip("*").replace("const ", "").strip()
    if name.startswith("tl."):
        name = name[3:]
    return _DTYPE_ALIASES.get(name)


def lossless(src: str | None, via: str | None) -> bool:
    """Whether converting a `src` value to `via` keeps it exactly."""
    if src is None or via is None:
        return False
    return src == via or via in _HOLDS.get(src, ())


# ----------------------------------------------------------------------------- results
@dataclasses.dataclass
class Chain:
    """A stored value traced back to one load: where it came from and the casts on the way."""

    ptr: str
    index: str
    dtypes: list[str | None]  # loaded dtype first, then each explicit conversion
    transposed: bool = False  # the load went through a transpose buffer (C++)


@dataclasses.dataclass
class Store:
    ptr: str
    index: str
    dtype: str | None
    chain: Chain | None  # None: the value is computed

    def verdict(self) -> tuple[bool, str | None]:
        """(is_noop, movement): movement names pure data movement that is not a no-op."""
        chain = self.chain
        if chain is None:
            return False, None
        dtypes = [chain.dtypes[0], *chain.dtypes[1:], self.dtype]
        src, dst = dtypes[0], dtypes[-1]
        if src is None or dst is None:
            return False, "copy (dtypes unknown)"
        if src != dst:
            return False, f"cast {src}->{dst}"
        if not all(lossless(src, d) for d in dtypes[1:]):
            trip = "->".join(_dedupe(dtypes))
            return False, f"lossy round trip {trip}"
        if re.search(r"\btmp\d+", chain.index) or re.search(r"\btmp\d+", self.index):
            return False, "gather/scatter copy (indirect index)"  # an embedding lookup, an index_put
        if chain.transposed or _norm_index(chain.index) != _norm_index(self.index):
            return False, "layout copy"
        return True, None


def _dedupe(items: Iterable) -> list:
    out: list = []
    for item in items:
        if not out or out[-1] != item:
            out.append(item)
    return out


def _norm_index(index: str) -> str:
    index = re.sub(r"static_cast<int64_t>\(([^()]*)\)", r"\1", index)
    index = re.sub(r"(?<=\d)L\b", "", index)
    return re.sub(r"[\s()]", "", index)


@dataclasses.dataclass
class BodyInfo:
    """What a kernel body does, as far as reading it tells."""

    stores: list[Store]
    body_ops: list[str]
    normalized: str  # body text without names that change from compile to compile
    params: dict[str, str | None]  # pointer parameter -> dtype, in order

    @property
    def is_noop(self) -> bool:
        return bool(self.stores) and all(s.verdict()[0] for s in self.stores)

    @property
    def noop_reason(self) -> str | None:
        if not self.is_noop:
            return None
        in_place = all(s.chain is not None and s.chain.ptr == s.ptr for s in self.stores)
        trips = {"->".join(_dedupe([s.chain.dtypes[0], *s.chain.dtypes[1:], s.dtype]))
                 for s in self.stores if s.chain is not None}
        trips = {t for t in trips if "->" in t}
        what = "in-place identity: writes back what it read" if in_place else "copy: stores what it loaded"
        return what + (f" (through {', '.join(sorted(trips))})" if trips else "")

    @property
    def movement(self) -> str | None:
        """For a kernel that only moves data but is not a no-op: what kind of movement."""
        if not self.stores or self.is_noop:
            return None
        verdicts = [s.verdict() for s in self.stores]
        if any(not noop and move is None for noop, move in verdicts):
            return None
        moves = sorted({move for noop, move in verdicts if move})
        return ", ".join(moves) or None

    @property
    def noop_stores(self) -> int:
        return sum(s.verdict()[0] for s in self.stores)

    def signature(self, kind: str) -> str:
        return hashlib.sha1(f"{kind}\n{self.normalized}".encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------- Triton
_TRITON_KINDS = {
    "pointwise": "triton_pointwise", "reduction": "triton_reduction",
    "persistent_reduction": "triton_persistent_reduction", "template": "triton_template",
    "user_autotune": "triton_user", "foreach": "triton_foreach", "split_scan": "triton_reduction",
    "cooperative_reduction": "triton_reduction", "combo_kernel": "triton_combo",
}
_TRITON_PREFIX_KINDS = {"poi": "triton_pointwise", "red": "triton_reduction",
                        "per": "triton_persistent_reduction", "tem": "triton_template",
                        "for": "triton_foreach", "mm": "triton_template"}
# calls in a Triton body that are bookkeeping, not computation on values
_TRITON_PLUMBING = {"tl.load", "tl.store", "tl.program_id", "tl.arange", "tl.full", "tl.num_programs",
                    "tl.static_assert", "tl.device_assert", "tl.multiple_of", "tl.max_contiguous",
                    "triton_helpers.promote_to_tensor", "tl.broadcast_to", "tl.reshape", "tl.where",
                    "tl.zeros", "tl.make_block_ptr", "tl.advance", "tl.debug_barrier", "range", "float",
                    "int", "bool"}


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def _triton_meta_signature(func: ast.FunctionDef) -> tuple[str | None, dict[str, str]]:
    """(heuristics decorator name, {param: signature type}) from the kernel's decorators."""
    kind, signature = None, {}
    for deco in func.decorator_list:
        if not isinstance(deco, ast.Call):
            continue
        name = _dotted(deco.func) or ""
        if name.startswith("triton_heuristics."):
            kind = name.split(".", 1)[1]
        for kw in deco.keywords:
            if kw.arg == "triton_meta" and isinstance(kw.value, ast.Dict):
                for key, value in zip(kw.value.keys, kw.value.values):
                    if isinstance(key, ast.Constant) and key.value == "signature":
                        try:
                            signature = ast.literal_eval(value)
                        except ValueError:
                            pass
    return kind, signature


def triton_kind(decorator: str | None, name: str) -> str:
    if decorator in _TRITON_KINDS:
        return _TRITON_KINDS[decorator]
    m = re.match(r"triton_(\w+?)_", name)
    if m and m.group(1) in _TRITON_PREFIX_KINDS:
        return _TRITON_PREFIX_KINDS[m.group(1)]
    return "triton_user" if not name.startswith("triton_") else "triton"


def _split_ptr(expr: ast.AST) -> tuple[str, str] | None:
    """`in_ptr0 + (x0)` -> ("in_ptr0", "x0")."""
    if isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.Add):
        if isinstance(expr.left, ast.Name):
            return expr.left.id, ast.unparse(expr.right)
        if isinstance(expr.right, ast.Name):
            return expr.right.id, ast.unparse(expr.left)
    if isinstance(expr, ast.Name):
        return expr.id, "0"
    return None


class _TritonReader:
    def __init__(self, func: ast.FunctionDef, signature: dict[str, str]) -> None:
        self.signature = signature
        self.defs: dict[str, Chain | None] = {}
        self.stores: list[Store] = []
        self.ops: list[str] = []
        self._walk(func.body)

    def _dtype(self, ptr: str) -> str | None:
        return norm_dtype(self.signature.get(ptr))

    def _trace(self, expr: ast.AST) -> Chain | None:
        if isinstance(expr, ast.Name):
            chain = self.defs.get(expr.id)
            return dataclasses.replace(chain, dtypes=list(chain.dtypes)) if chain else None
        if isinstance(expr, ast.Call):
            name = _dotted(expr.func)
            if name == "tl.load" and expr.args:
                split = _split_ptr(expr.args[0])
                if split:
                    return Chain(split[0], split[1], [self._dtype(split[0])])
                return None
            if isinstance(expr.func, ast.Attribute) and expr.func.attr == "to" and expr.args:
                if any(kw.arg == "bitcast" for kw in expr.keywords):
                    return None  # reinterprets bits: not a value conversion
                inner = self._trace(expr.func.value)
                target = norm_dtype(_dotted(expr.args[0]) or "")
                if inner is None or target is None:
                    return None
                # `tl.load(...).to(tl.float32)` is Inductor's (lossless) upcast of a
                # low-precision load, part of the load itself, not a conversion the model asked for
                if not (isinstance(expr.func.value, ast.Call) and _dotted(expr.func.value.func) == "tl.load"):
                    inner.dtypes.append(target)
                return inner
            if name == "triton_helpers.promote_to_tensor" and expr.args:
                return self._trace(expr.args[0])
        return None

    def _note_ops(self, expr: ast.AST) -> None:
        for node in ast.walk(expr):
            if isinstance(node, ast.Call):
                name = _dotted(node.func)
                if name and name not in _TRITON_PLUMBING and not name.endswith(".to"):
                    self.ops.append(name.split(".")[-1] if name.startswith(("tl.", "libdevice.", "tl_math."))
                                    else name)
            elif isinstance(node, ast.BinOp) and not isinstance(node.op, (ast.BitAnd, ast.BitOr)):
                self.ops.append(type(node.op).__name__.lower())  # (& and | combine masks)
            elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
                self.ops.append("neg")

    def _walk(self, body: list[ast.stmt]) -> None:
        for stmt in body:
            if isinstance(stmt, (ast.For, ast.While, ast.If, ast.With)):
                self._walk(stmt.body)
                self._walk(getattr(stmt, "orelse", []))
                continue
            if isinstance(stmt, ast.Assign):
                chain = self._trace(stmt.value)
                for target in stmt.targets:
                    for name in ast.walk(target):
                        if isinstance(name, ast.Name):
                            self.defs[name.id] = chain if isinstance(target, ast.Name) else None
                if chain is None and any(isinstance(t, ast.Name) and t.id.lstrip("_").startswith("tmp")
                                         for t in stmt.targets):
                    self._note_ops(stmt.value)
            elif isinstance(stmt, ast.AugAssign) and isinstance(stmt.target, ast.Name):
                self.defs[stmt.target.id] = None
            elif isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call):
                call = stmt.value
                name = _dotted(call.func)
                if name == "tl.store" and len(call.args) >= 2:
                    split = _split_ptr(call.args[0]) or ("?", ast.unparse(call.args[0]))
                    chain = self._trace(call.args[1])
                    if chain is None:
                        self._note_ops(call.args[1])
                    self.stores.append(Store(split[0], split[1], self._dtype(split[0]), chain))
                elif name and name.startswith("tl.atomic"):
                    self.stores.append(Store("?", "?", None, None))
                    self.ops.append(name.split(".")[-1])
                elif name in ("tl.dot",):
                    self.ops.append("dot")


class _F32Literals(ast.NodeTransformer):
    """`tl.full(shape, 1e-06, tl.float32)` and `tl.full(shape, 9.999999974752427e-07, tl.float32)` are
    the same constant: Inductor spells an f32 scalar either way (from a Python float, or from the
    f32 value a rewrite computed). The signature compares the f32 value."""

    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        if (_dotted(node.func) == "tl.full" and len(node.args) == 3 and _dotted(node.args[2]) == "tl.float32"
                and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, float)):
            value = struct.unpack("f", struct.pack("f", node.args[1].value))[0]
            node.args[1] = ast.Constant(value)
        return node


def _f32_literals(stmt: ast.stmt) -> ast.AST:
    return _F32Literals().visit(copy.deepcopy(stmt))


def read_triton(source: str, name: str) -> tuple[str, BodyInfo | None]:
    """(kind, body info) of a Triton kernel source as embedded in output code."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return triton_kind(None, name), None
    funcs = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    if not funcs:
        return triton_kind(None, name), None
    func = funcs[-1]
    decorator, signature = _triton_meta_signature(func)
    kind = triton_kind(decorator, name)
    reader = _TritonReader(func, signature)
    # what it computes: the body without the kernel's own (numbered) name
    body = "\n".join(ast.unparse(_f32_literals(stmt)) for stmt in func.body)
    params = [a.arg for a in func.args.args]
    normalized = f"({', '.join(params)})\n{body}"
    ptr_params = {p: norm_dtype(t) for p, t in signature.items() if isinstance(t, str) and t.startswith("*")}
    ops = list(dict.fromkeys(reader.ops))
    if kind == "triton_template" and "dot" not in ops and "tl.dot" in source:
        ops.insert(0, "dot")
    return kind, BodyInfo(reader.stores, ops, normalized, ptr_params)


# ----------------------------------------------------------------------------- C++
_CPP_PARAM = re.compile(r"((?:const\s+)?[\w:]+)\s*\*\s*(\w+)")
_CPP_DEF = re.compile(r"^\s*(?:auto\s+|(?:[\w:]+(?:<[^;=]*>)?\s+))?(\w+)\s*=\s*(.+);\s*$")
_CPP_VSTORE = re.compile(r"^\s*(\w+)\.store\((.+)\);\s*$")
_CPP_SSTORE = re.compile(r"^\s*(\w+)\[(.+)\]\s*=\s*(.+);\s*$")
_CPP_TRANSPOSE = re.compile(r"^\s*transpose_mxn<([^,>]+)[^>]*>\((.+)\);\s*$")
_CPP_LOADU = re.compile(r"^at::vec::VectorizedN?<([^>]+)>::loadu\((.+)\)$")
_CPP_CONVERT = re.compile(r"^(?:at::vec::convert|c10::convert|static_cast)<([^,>]+)(?:,[^>]*)?>\((\w+)\)$")
_CPP_CALL = re.compile(r"([A-Za-z_][\w:]*)\s*(?:<[^()]*>)?\s*\(")
_CPP_PLUMBING = {"static_cast", "at::vec::Vectorized", "at::vec::VectorizedN", "c10::convert",
                 "at::vec::convert", "loadu", "C10_LIKELY", "C10_UNLIKELY", "omp_get_thread_num", "float",
                 "int", "alignof", "std::size_t"}


def _split_args(text: str) -> list[str]:
    """Top-level comma split of a C++ argument list (brackets, parentheses, template args)."""
    out, depth, cur = [], 0, []
    for ch in text:
        if ch in "(<[":
            depth += 1
        elif ch in ")>]" and depth > 0:
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if cur:
        out.append("".join(cur).strip())
    return out


def _cpp_ptr(expr: str) -> tuple[str, str] | None:
    m = re.match(r"^(\w+)\s*\+\s*(.+)$", expr.strip())
    return (m.group(1), m.group(2)) if m else None


class _CppReader:
    def __init__(self, source: str) -> None:
        self.params: dict[str, str | None] = {}
        m = re.search(r'extern "C"[^(]*\bkernel\s*\(([^)]*)\)', source)
        for ctype, pname in _CPP_PARAM.findall(m.group(1) if m else ""):
            self.params[pname] = norm_dtype(ctype)
        for line in source.splitlines():
            m2 = re.match(r"^\s*auto (\w+) = (in_out_ptr\d+|out_ptr\d+|in_ptr\d+);", line)
            if m2:  # `auto out_ptr0 = in_out_ptr0;`
                self.params[m2.group(1)] = self.params.get(m2.group(2))
        self.defs: dict[str, Chain | None] = {}
        self.transposed: dict[str, Chain] = {}
        self.stores: list[Store] = []
        self.ops: list[str] = []
        for line in source.splitlines():
            self._line(line)

    def _trace(self, expr: str) -> Chain | None:
        expr = expr.strip()
        if re.fullmatch(r"\w+", expr):
            if expr in self.defs:
                chain = self.defs[expr]
                return dataclasses.replace(chain, dtypes=list(chain.dtypes)) if chain else None
            return None
        m = _CPP_LOADU.match(expr)
        if m:
            args = _split_args(m.group(2))
            split = _cpp_ptr(args[0]) if args else None
            if split is None:
                return None
            ptr, index = split
            if ptr in self.transposed:
                base = self.transposed[ptr]
                return Chain(base.ptr, base.index, list(base.dtypes), transposed=True)
            return Chain(ptr, index, [self.params.get(ptr, norm_dtype(m.group(1)))])
        m = re.fullmatch(r"(\w+)\[(.+)\]", expr)
        if m and m.group(1) in self.params:
            return Chain(m.group(1), m.group(2), [self.params[m.group(1)]])
        m = _CPP_CONVERT.match(expr)
        if m and m.group(2) in self.defs:
            inner = self._trace(m.group(2))
            target = norm_dtype(m.group(1).strip())
            if inner is None or target is None:
                return None
            inner.dtypes.append(target)
            return inner
        return None

    def _note_ops(self, expr: str) -> None:
        for name in _CPP_CALL.findall(expr):
            if name not in _CPP_PLUMBING and not name.startswith("static_cast"):
                self.ops.append(name.split("::")[-1])
        for op, label in (("*", "mult"), ("+", "add"), (" - ", "sub"), ("/", "div")):
            if op in re.sub(r"\w+\s*\+\s*static_cast|<[^<>]*>", "", expr):
                self.ops.append(label)

    def _line(self, line: str) -> None:
        m = _CPP_TRANSPOSE.match(line)
        if m:
            args = _split_args(m.group(2))
            split = _cpp_ptr(args[0]) if args else None
            if split and len(args) >= 3:
                dtype = self.params.get(split[0], norm_dtype(m.group(1)))
                self.transposed[args[2].strip()] = Chain(split[0], split[1], [dtype], transposed=True)
            return
        m = _CPP_VSTORE.match(line)
        if m:
            args = _split_args(m.group(2))
            split = _cpp_ptr(args[0]) if args else None
            if split:
                chain = self._trace(m.group(1))
                if chain is None:
                    self._note_ops(m.group(1))
                self.stores.append(Store(split[0], split[1], self.params.get(split[0]), chain))
            return
        m = _CPP_SSTORE.match(line)
        if m and m.group(1) in self.params:
            chain = self._trace(m.group(3))
            if chain is None:
                self._note_ops(m.group(3))
            self.stores.append(Store(m.group(1), m.group(2), self.params.get(m.group(1)), chain))
            return
        m = _CPP_DEF.match(line)
        if m and not line.strip().startswith(("for", "if", "#")):
            name, expr = m.group(1), m.group(2)
            if name in self.params:
                return
            chain = self._trace(expr)
            self.defs[name] = chain
            if chain is None:
                self._note_ops(expr)


def read_cpp(source: str) -> BodyInfo:
    reader = _CppReader(source)
    normalized = "\n".join(line.strip() for line in source.splitlines() if line.strip())
    return BodyInfo(reader.stores, list(dict.fromkeys(reader.ops)), normalized,
                    {p: d for p, d in reader.params.items() if p.startswith(("in_", "out_", "in_out_"))})
