"""The fused kernels as PyTorch operators: the custom operators ``torch.ops.mpd_triton.lif_fwd`` /
``lif_bwd`` (the Triton kernels) and ``lif_fwd_cpu`` / ``lif_bwd_cpu`` (the C kernels of
``kernels/cpu.py``), and the eager path ``fused_lif`` that calls the same launchers with less
overhead. One backward formula (``_backward``) serves both.

Registering the custom operators (schema, fake implementation, autograd) lets ``torch.compile``
trace ``mt.lif`` / ``mt.LIF`` with ``fullgraph=True``: Dynamo puts one opaque node per call in the
graph, AOTAutograd takes the backward from the registered formula (which calls ``lif_bwd``), and
fake tensors get the output shapes, dtypes and strides from the same allocation code as the real
launch (``kernels.layout.forward_buffers`` / ``backward_buffers``).

Outside ``torch.compile`` a custom operator costs tens of microseconds of Python per call (its
schema handling and dispatch), more than a small layer's kernels; eagerly, ``fused_lif`` runs the
launchers through a ``torch.autograd.Function`` instead. Both paths call the same launchers with
the same arguments and the same backward, so they return the same bits (``tests/library/test_compile.py``).

They are ``torch.library.custom_op`` rather than ``triton_op``: the kernels already fuse
everything there is to fuse around the LIF, and an opaque op runs the same host launcher eagerly,
under ``opcheck`` and under ``torch.compile``, on a GPU and under the Triton interpreter alike (a
``triton_op`` traces its launcher with fake tensors, which the interpreter cannot run, so it could
not be tested without a GPU).

Schemas carry no Python objects: the neuron travels as the fields of ``KernelParams`` (floats,
bools and the surrogate's integer id), in that order. The Python floats reach the kernels as
float32 arguments, so no float64 scalar enters the compiled code. Outputs that were not asked for
are empty tensors (an operator returns a fixed number of tensors). The last, optional argument of
both, ``surrogate_param_tensor``, overrides the surrogate's scalar parameter per channel or per
element in the backward (``mt.lif(..., surrogate_param=)``); ``lif_fwd`` takes it only to hand it
to the backward.

These are internal: call ``mt.lif`` (it validates its input first).
"""

import contextlib
import typing
from typing import Optional

import torch
from torch import Tensor

from .kernels import cpu as _cpu_kernels
from .kernels import layout as _layout
from .kernels import runtime as _runtime
from .neuron import KernelParams

if _runtime.TRITON_MISSING is None:
    from .kernels import lif as _kernels
else:
    class _kernels:  # noqa: N801 (stands in for the module kernels.lif where triton is missing)
        """The Triton launchers' stand-in: the operators keep their schemas and fake implementations
        (so torch.compile traces the same graph), and a launch says in one line why it cannot run."""

        forward_buffers, backward_buffers = staticmethod(_layout.forward_buffers), staticmethod(_layout.backward_buffers)

        @staticmethod
        def lif_forward(*args, **kwargs):
            raise RuntimeError(f"the Triton backend cannot run: {_runtime.TRITON_MISSING}")

        lif_backward = lif_forward

__all__ = ["lif_fwd", "lif_bwd", "lif_fwd_cpu", "lif_bwd_cpu", "fused_lif", "BACKEND_KERNELS"]

# backend name -> (the launchers' module, the device context of a launch)
BACKEND_KERNELS = {"triton": (_kernels, _runtime.device_guard),
                   "cpu": (_cpu_kernels, lambda t: contextlib.nullcontext())}

_N_PARAMS = len(KernelParams._fields)

# The operators' schemas. The neuron's part is KernelParams' fields in their order, typed from its
# annotations (a Python int is a SymInt in a schema, as torch.library.infer_schema writes it), so
# the field list is written once, in KernelParams; the operators take it as ``*args`` and split it
# off with ``_split_params``.
_SCHEMA_TYPES = {float: "float", bool: "bool", int: "SymInt"}
_PARAMS_SCHEMA = ", ".join(f"{_SCHEMA_TYPES[t]} {name}" for name, t in typing.get_type_hints(KernelParams).items())
_FWD_SCHEMA = (f"(Tensor x, Tensor? v_init, {_PARAMS_SCHEMA}, bool stats, bool save_state, bool save_u, "
               "Tensor? surrogate_param_tensor=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")
_BWD_SCHEMA = ("(Tensor? grad_spikes, Tensor u_saved, Tensor? mpd_a, Tensor? mpd_b, Tensor? grad_v_T, "
               f"{_PARAMS_SCHEMA}, bool need_grad_v0, Tensor? surrogate_param_tensor=None) -> (Tensor, Tensor)")


def _split_params(args: tuple) -> tuple[KernelParams, tuple]:
    """An operator's arguments from the neuron's first one on -> (the neuron, the arguments after it)."""
    return KernelParams(*args[:_N_PARAMS]), tuple(args[_N_PARAMS:])


def _or_empty(t: Optional[Tensor], like: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t is not None else like.new_empty(0, dtype=dtype)


def _forward_outputs(x: Tensor, outputs) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    spikes, u_saved, mean, var, v_T = outputs
    return (spikes, _or_empty(u_saved, x, x.dtype), _or_empty(mean, x, torch.float32),
            _or_empty(var, x, torch.float32), _or_empty(v_T, x, x.dtype))


def _mpd_terms(u_saved: Tensor, mean: Tensor, grad_mean: Optional[Tensor], grad_var: Optional[Tensor]):
    """(a, b), float32 [T, C], with dL/du = a + b u for every element of (t, c), from the gradients of
    the statistics (docs/design.md, section 4); (None, None) when neither has a gradient."""
    if grad_mean is None and grad_var is None:
        return None, None
    M = u_saved.numel() // (u_saved.shape[0] * u_saved.shape[2])
    if _cpu_kernels.takes_float32(mean, grad_mean, grad_var):
        return _cpu_kernels.mpd_terms(mean, grad_mean, grad_var, M)  # the operations below in one C loop
    # Integer scalars only: a Python float derived from a (symbolic) size would be a float64 scalar
    # in the compiled graph.
    gm = grad_mean.float() if grad_mean is not None else torch.zeros_like(mean)
    gvar = grad_var.float() if grad_var is not None else torch.zeros_like(mean)
    mpd_b = (gvar * 2 / M).contiguous()
    mpd_a = (gm / M - mpd_b * mean).contiguous()
    return mpd_a, mpd_b


def _backward(run_bwd, ctx, grad_spikes, grad_mean, grad_var, grad_v_T):
    """The backward of both paths: (grad_x, grad_v_init). run_bwd(grad_spikes, u_saved, mpd_a, mpd_b,
    grad_v_T, params, need_grad_v0, surrogate_param) -> (grad_x, grad_v0 float32)."""
    if not ctx.saved_u:
        raise RuntimeError("the fused LIF forward ran with save_u=False (no input required a gradient), so it "
                           "cannot be differentiated")
    u_saved, mean, sg_tensor = ctx.saved_tensors
    if not ctx.stats:  # the placeholders of outputs not asked for carry no gradient
        grad_mean = grad_var = None
    if not ctx.save_state:
        grad_v_T = None
    mpd_a, mpd_b = _mpd_terms(u_saved, mean, grad_mean, grad_var)
    need_grad_v0 = ctx.needs_input_grad[1]
    grad_x, grad_v0 = run_bwd(grad_spikes, u_saved, mpd_a, mpd_b, grad_v_T, ctx.params, need_grad_v0, sg_tensor)
    return grad_x, (grad_v0.to(ctx.v_init_dtype) if need_grad_v0 else None)


def _save(ctx, v_init, u_saved, mean, params, stats, save_state, save_u, sg_tensor):
    ctx.save_for_backward(u_saved, mean, sg_tensor)
    ctx.params = tuple(params)
    ctx.saved_u, ctx.stats, ctx.save_state = save_u, stats, save_state
    ctx.v_init_dtype = v_init.dtype if v_init is not None else None


def _define(suffix: str, kernels, device_guard):
    """Register ``mpd_triton::lif_fwd{suffix}`` / ``lif_bwd{suffix}`` (schemas, fake implementations,
    autograd) over one implementation of the kernels: a module with ``lif_forward``,
    ``lif_backward``, ``forward_buffers`` and ``backward_buffers``."""

    @torch.library.custom_op(f"mpd_triton::lif_fwd{suffix}", mutates_args=(), schema=_FWD_SCHEMA)
    def lif_fwd(x: Tensor, v_init: Optional[Tensor], *args) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(spikes, u_saved, mean, var, v_T); see ``kernels.lif.lif_forward``. ``args``: the neuron
        (KernelParams' fields), stats, save_state, save_u, surrogate_param_tensor (``_FWD_SCHEMA``). The
        forward does not read ``surrogate_param_tensor``: it is an input only so that the backward gets it."""
        params, (stats, save_state, save_u, *_) = _split_params(args)
        with device_guard(x):
            outputs = kernels.lif_forward(x, params, v_init=v_init, stats=stats, save_state=save_state, save_u=save_u)
        return _forward_outputs(x, outputs)

    @lif_fwd.register_fake
    def _lif_fwd_fake(x, v_init, *args):
        _, (stats, save_state, save_u, *_) = _split_params(args)
        return _forward_outputs(x, kernels.forward_buffers(x, stats=stats, save_state=save_state, save_u=save_u))

    @torch.library.custom_op(f"mpd_triton::lif_bwd{suffix}", mutates_args=(), schema=_BWD_SCHEMA)
    def lif_bwd(grad_spikes: Optional[Tensor], u_saved: Tensor, mpd_a: Optional[Tensor], mpd_b: Optional[Tensor],
                grad_v_T: Optional[Tensor], *args) -> tuple[Tensor, Tensor]:
        """(grad_x, grad_v0 float32); see ``kernels.lif.lif_backward``. ``args``: the neuron (KernelParams'
        fields), need_grad_v0, surrogate_param_tensor (``_BWD_SCHEMA``). No autograd formula is registered
        for it, so double backward through the kernels is refused."""
        params, (need_grad_v0, *sg_tensor) = _split_params(args)
        with device_guard(u_saved):
            grad_x, grad_v0 = kernels.lif_backward(grad_spikes, u_saved, params, mpd_a=mpd_a, mpd_b=mpd_b,
                                                   grad_v_T=grad_v_T, need_grad_v0=need_grad_v0,
                                                   surrogate_param=sg_tensor[0] if sg_tensor else None)
        return grad_x, _or_empty(grad_v0, u_saved, torch.float32)

    @lif_bwd.register_fake
    def _lif_bwd_fake(grad_spikes, u_saved, mpd_a, mpd_b, grad_v_T, *args):
        _, (need_grad_v0, *_) = _split_params(args)
        grad_x, grad_v0 = kernels.backward_buffers(u_saved, need_grad_v0=need_grad_v0)
        return grad_x, _or_empty(grad_v0, u_saved, torch.float32)

    def setup_context(ctx, inputs, output):
        x, v_init, *args = inputs
        params, (stats, save_state, save_u, *sg_tensor) = _split_params(args)
        _, u_saved, mean, _, _ = output
        ctx.mark_non_differentiable(u_saved)
        ctx.set_materialize_grads(False)
        _save(ctx, v_init, u_saved, mean, params, stats, save_state, save_u, sg_tensor[0] if sg_tensor else None)

    def run_bwd(grad_spikes, u_saved, mpd_a, mpd_b, grad_v_T, params, need_grad_v0, sg_tensor):
        return lif_bwd(grad_spikes, u_saved, mpd_a, mpd_b, grad_v_T, *params, need_grad_v0, sg_tensor)

    def backward(ctx, grad_spikes, grad_u_saved, grad_mean, grad_var, grad_v_T):
        grad_x, grad_v0 = _backward(run_bwd, ctx, grad_spikes, grad_mean, grad_var, grad_v_T)
        return (grad_x, grad_v0) + (None,) * (len(ctx.needs_input_grad) - 2)

    lif_fwd.register_autograd(backward, setup_context=setup_context)
    return lif_fwd, lif_bwd


lif_fwd, lif_bwd = _define("", *BACKEND_KERNELS["triton"])
lif_fwd_cpu, lif_bwd_cpu = _define("_cpu", *BACKEND_KERNELS["cpu"])
_OPS = {"triton": lif_fwd, "cpu": lif_fwd_cpu}


class _FusedLIF(torch.autograd.Function):
    """The eager path: the custom operators' launchers and backward, without their dispatch."""

    @staticmethod
    def forward(ctx, x, v_init, backend, params, stats, save_state, save_u, sg_tensor):
        kernels, device_guard = BACKEND_KERNELS[backend]
        with device_guard(x):
            outputs = kernels.lif_forward(x, params, v_init=v_init, stats=stats, save_state=save_state, save_u=save_u)
        spikes, u_saved, mean, var, v_T = _forward_outputs(x, outputs)
        ctx.set_materialize_grads(False)
        ctx.backend = backend
        _save(ctx, v_init, u_saved, mean, params, stats, save_state, save_u, sg_tensor)
        return spikes, mean, var, v_T

    @staticmethod
    def backward(ctx, grad_spikes, grad_mean, grad_var, grad_v_T):
        kernels, device_guard = BACKEND_KERNELS[ctx.backend]

        def run_bwd(grad_spikes, u_saved, mpd_a, mpd_b, grad_v_T, params, need_grad_v0, sg_tensor):
            with device_guard(u_saved):
                return kernels.lif_backward(grad_spikes, u_saved, KernelParams(*params), mpd_a=mpd_a, mpd_b=mpd_b,
                                            grad_v_T=grad_v_T, need_grad_v0=need_grad_v0,
                                            surrogate_param=sg_tensor)

        grad_x, grad_v0 = _backward(run_bwd, ctx, grad_spikes, grad_mean, grad_var, grad_v_T)
        return grad_x, grad_v0, None, None, None, None, None, None

    @staticmethod
    def jvp(ctx, *grads):  # pragma: no cover - forward-mode AD is not implemented
        raise NotImplementedError("forward-mode AD through the fused LIF kernels is not implemented")


def fused_lif(backend: str, x: Tensor, v_init: Optional[Tensor], params: KernelParams, stats: bool,
              save_state: bool, save_u: bool, surrogate_param: Optional[Tensor] = None):
    """(spikes, mean, var, v_T) of the fused kernels ("triton" or "cpu"); mean/var/v_T are empty
    tensors when not asked for. Under torch.compile and other tracing (``runtime.traced``: make_fx,
    FakeTensorMode, tensor subclasses) the custom operator (one opaque graph node), otherwise the same
    launchers through ``_FusedLIF``."""
    if _runtime.traced(x, v_init, surrogate_param):
        spikes, _, mean, var, v_T = _OPS[backend](x, v_init, *params, stats, save_state, save_u, surrogate_param)
        return spikes, mean, var, v_T
    if not save_u:  # nothing to differentiate: no autograd node
        kernels, device_guard = BACKEND_KERNELS[backend]
        with device_guard(x):
            outputs = kernels.lif_forward(x, params, v_init=v_init, stats=stats, save_state=save_state, save_u=False)
        spikes, _, mean, var, v_T = _forward_outputs(x, outputs)
        return spikes, mean, var, v_T
    return _FusedLIF.apply(x, v_init, backend, params, stats, save_state, save_u, surrogate_param)
