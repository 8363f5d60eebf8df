"""Norm and quant-tail spellings as real models write them, shared by the norm-quant tests.

Each norm spelling maps (x, weight, eps) to the normalised tensor; each tail maps the
normalised tensor (and a static scale) to (q, scale). `make_fn` glues one of each, with
or without a residual add in front, into a function of tensors only, so that the
post-grad graph's placeholders are exactly its arguments.

Also: `capture_post_grad`, which stops Inductor right after the post-grad passes (no
code generation, no C++ compile) and returns the graph fusewright would see, and
`run_graph`, which runs such a graph eagerly.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FMAX = 448.0
EPS = 1e-6
BF16 = torch.bfloat16
F32 = torch.float32


# --------------------------------------------------------------------------- norms
def norm_llama(x, w, eps=EPS):
    h = x.to(F32)
    var = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(var + eps)
    return w * h.to(x.dtype)


def norm_olmo2(x, w, eps=EPS):
    h = x.to(F32)
    var = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(var + eps)
    return (w * h).to(x.dtype)


def norm_gemma(x, w, eps=EPS):
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    h = h * (1.0 + w.float())
    return h.type_as(x)


def norm_implicit(x, w, eps=EPS):
    # diffusers RMSNorm with an f32 weight: no cast back, the output is f32.
    var = x.to(F32).pow(2).mean(-1, keepdim=True)
    h = x * torch.rsqrt(var + eps)
    return h * w.float()


def norm_t5(x, w, eps=EPS):
    var = x.to(F32).pow(2).mean(-1, keepdim=True)
    h = x * torch.rsqrt(var + eps)
    return w * h.to(w.dtype)


def norm_frms(x, w, eps=EPS):
    return F.rms_norm(x, (x.shape[-1],), w, eps)


def norm_pow(x, w, eps=EPS):
    # Gemma4-like pow(-0.5), mean over the positive last dim.
    h = x.float()
    var = (h * h).mean(dim=x.dim() - 1, keepdim=True)
    h = h * torch.pow(var + eps, -0.5)
    return h.to(x.dtype) * w


def norm_div_sqrt(x, w, eps=EPS):
    h = x.float()
    var = h.pow(2).mean(-1, keepdim=True)
    h = h / torch.sqrt(var + eps)
    return w * h.to(x.dtype)


def norm_noweight(x, w, eps=EPS):
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return h.to(x.dtype)


NORMS = {
    "llama": norm_llama,
    "olmo2": norm_olmo2,
    "gemma": norm_gemma,
    "implicit": norm_implicit,
    "t5": norm_t5,
    "frms": norm_frms,
    "pow": norm_pow,
    "div_sqrt": norm_div_sqrt,
    "noweight": norm_noweight,
}
# weight dtype each norm spelling is used with
WEIGHT_DTYPE = {"implicit": F32}


# --------------------------------------------------------------------------- tails
def tail_static_div(y, scale):
    return ((y.to(F32) / scale).clamp(-FMAX, FMAX).to(FP8),)


def tail_static_recip(y, scale):
    return ((y.to(F32) * scale.reciprocal()).clamp(min=-FMAX, max=FMAX).to(FP8),)


def tail_vllm_token(y, scale=None):
    amax = y.abs().amax(-1, keepdim=True).to(F32)
    s = (amax / FMAX).clamp(min=1.0 / (FMAX * 512.0))
    q = (y.to(F32) * s.reciprocal()).clamp(-FMAX, FMAX).to(FP8)
    return q, s


def tail_vllm_token_ub(y, scale=None):
    amax = y.abs().amax(-1).to(F32).clamp(max=1200.0)
    s = (amax / FMAX).unsqueeze(-1).clamp(min=1.0 / (FMAX * 512.0))
    q = (y.to(F32) * s.reciprocal()).clamp(-FMAX, FMAX).to(FP8)
    return q, s


def tail_torchao_row(y, scale=None):
    # torchao float8 rowwise inference: amax and the /448 in the activation dtype.
    amax = y.abs().amax(dim=-1, keepdim=True)
    s = (amax / torch.finfo(FP8).max).to(F32)
    q = (y.to(F32) / s).clamp(min=-FMAX, max=FMAX).to(FP8)
    return q, s


def tail_f32_token(y, scale=None):
    # amax of the f32 value, scale floor 1e-12, divide
    yf = y.float()
    amax = torch.amax(torch.abs(yf), dim=-1, keepdim=True)
    s = torch.clamp(amax / FMAX, min=1e-12)
    return torch.clamp(yf / s, -FMAX, FMAX).to(FP8), s


def tail_training(y, scale=None):
    # torchao float8 training: f64 multiplier scale
    amax = y.abs().amax(-1, keepdim=True).to(torch.float64)
    s = (FMAX / torch.clamp(amax, min=1e-12)).to(F32)
    return (y.to(F32) * s).clamp(-FMAX, FMAX).to(FP8), s


def _group(y, gs, col, ue8m0):
    shape = y.shape
    g = y.reshape(-1, shape[-1] // gs, gs)
    amax = g.abs().max(dim=-1, keepdim=True)[0].clamp(min=1e-10).to(F32)
    s = amax / FMAX
    if ue8m0:
        s = torch.exp2(torch.ceil(torch.log2(s.abs())))
    q = (g / s).clamp(min=-FMAX, max=FMAX).to(FP8).reshape(shape)
    s = s.reshape(shape[:-1] + (shape[-1] // gs,))
    if col:
        s = s.transpose(-1, -2).contiguous().transpose(-1, -2)
    return q, s


def tail_group128(y, scale=None):
    return _group(y, 128, False, False)


def tail_group64_col(y, scale=None):
    return _group(y, 64, True, False)


def tail_group128_ue8m0(y, scale=None):
    return _group(y, 128, False, True)


def tail_int8_token(y, scale=None):
    # vLLM reference int8: divisor amax/127 of the f32 value
    yf = y.float()
    s = yf.abs().amax(-1, keepdim=True) / 127.0
    return (yf / s).round().clamp(-128, 127).to(torch.int8), s


def tail_int8_bitnet(y, scale=None):
    s = 127.0 / y.float().abs().max(dim=-1, keepdim=True).values.clamp(min=1e-5)
    return (y.float() * s).round().clamp(-128, 127).to(torch.int8), s


TAILS = {
    "static_div": tail_static_div,
    "static_recip": tail_static_recip,
    "vllm_token": tail_vllm_token,
    "vllm_token_ub": tail_vllm_token_ub,
    "torchao_row": tail_torchao_row,
    "f32_token": tail_f32_token,
    "training": tail_training,
    "group128": tail_group128,
    "group64_col": tail_group64_col,
    "group128_ue8m0": tail_group128_ue8m0,
    "int8_token": tail_int8_token,
    "int8_bitnet": tail_int8_bitnet,
}
STATIC_TAILS = ("static_div", "static_recip")


def make_fn(norm: str, tail: str, residual: bool, eps: float = EPS, extra_user: bool = False):
    """fn(x, w[, residual][, scale]) -> outputs, for one norm spelling x one tail.

    The signature is explicit (no *args) so that Dynamo's graph inputs follow it.
    """
    nf, tf = NORMS[norm], TAILS[tail]
    static = tail in STATIC_TAILS

    def body(x, w, res, scale):
        outs = []
        if res is not None:
            x = x + res
            outs.append(x)
        y = nf(x, w, eps)
        outs.extend(tf(y, scale))
        if extra_user:
            outs.append(y.sum(-1))
        return tuple(outs)

    if residual and static:
        def fn(x, w, res, scale):
            return body(x, w, res, scale)
    elif residual:
        def fn(x, w, res):
            return body(x, w, res, None)
    elif static:
        def fn(x, w, scale):
            return body(x, w, None, scale)
    else:
        def fn(x, w):
            return body(x, w, None, None)

    fn.__name__ = f"{norm}__{tail}{'__res' if residual else ''}"
    return fn


def make_inputs(norm: str, tail: str, residual: bool, tokens: int = 8, hidden: int = 256, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(tokens, hidden, generator=g) * 2).to(BF16)
    wdt = WEIGHT_DTYPE.get(norm, BF16)
    w = (1 + 0.2 * torch.randn(hidden, generator=g)).to(wdt)
    args = [x, w]
    if residual:
        args.append((torch.randn(tokens, hidden, generator=g)).to(BF16))
    if tail in STATIC_TAILS:
        args.append(torch.tensor([0.02], dtype=F32))
    return args


# ---------------------------------------------------------------- graph capture
class _Captured(Exception):
    pass


def capture_post_grad(fn, inputs, dynamic=False) -> tuple[fx.Graph, list]:
    """The post-grad graph Inductor hands to custom post passes, without code generation,
    and the real tensors its placeholders stand for (Dynamo orders graph inputs its own way)."""
    from torch._inductor import config as inductor_config
    from torch._inductor.compile_fx import compile_fx

    from fusewright.passes.graph_utils import snapshot

    box: list[fx.Graph] = []
    graph_inputs: list[list] = []

    class Stop(torch._inductor.custom_graph_pass.CustomGraphPass):
        def __call__(self, graph):
            box.append(snapshot(graph))
            raise _Captured()

        def uuid(self):
            return None

    def backend(gm, example_inputs):
        graph_inputs.append(list(example_inputs))
        return compile_fx(gm, example_inputs)

    torch._dynamo.reset()
    with inductor_config.patch(
        {"post_grad_custom_post_pass": Stop(), "fx_graph_cache": False, "fx_graph_remote_cache": False}
    ):
        try:
            # no_grad: an inference graph, as fusewright.testing compiles (with grad, AOT
            # saves intermediates such as rsqrt for a backward and they gain users)
            with torch.no_grad():
                torch.compile(fn, backend=backend, dynamic=dynamic, fullgraph=True)(*inputs)
        except Exception:  # noqa: BLE001 - Dynamo wraps our stop signal
            if not box:
                raise
    torch._dynamo.reset()
    return box[0], graph_inputs[0]


def run_graph(graph: fx.Graph, graph_inputs):
    """Run a post-grad graph eagerly on the real tensors of its placeholders."""
    gm = fx.GraphModule(torch.nn.Module(), graph)
    with torch.no_grad():
        out = gm(*graph_inputs)
    return tuple(out) if isinstance(out, (list, tuple)) else (out,)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype == FP8:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    if not a.is_floating_point():
        return torch.equal(a, b)
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


def fp8_ulp_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|difference| in representable steps between two fp8 (or int8) tensors."""
    if a.dtype == torch.int8:
        return (a.to(torch.int32) - b.to(torch.int32)).abs()
    # e4m3fn bytes are sign-magnitude: map to a monotone integer line
    def line(t):
        u = t.view(torch.uint8).to(torch.int32)
        mag = u & 0x7F
        return torch.where(u & 0x80 != 0, -mag, mag)

    return (line(a) - line(b)).abs()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(((a - b).abs() / b.abs().clamp(min=1e-30)).max()) if a.numel() else 0.0


__all__ = [n for n in dir() if not n.startswith("_")] + ["math"]
