"""Loads the native extension and registers what torch needs around its ops: fake (meta)
implementations for torch.compile and autograd formulas. Schemas and device kernels live in
csrc/bindings.cpp.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch

try:  # the extension is optional: without it every op runs its plain-PyTorch reference
    from alphagrpo_serve import _C  # noqa: F401  (loading it registers torch.ops.alphagrpo.*)

    _LOAD_ERROR: Optional[BaseException] = None
except ImportError as exc:  # pragma: no cover - exercised only on a broken or missing build
    _C = None
    _LOAD_ERROR = exc

_WARNED: set = set()


def have_extension() -> bool:
    return _C is not None


def build_info() -> dict:
    """What the extension was built with: {'loaded', 'with_cuda', 'cuda_archs', 'cpu_isa',
    'linear_chunk_bytes', 'error'} (cpu_isa: the vectorised CPU loops in use, 'avx512', 'avx2' or
    'scalar'; linear_chunk_bytes: grpo_linear_token_loss's default budget for one chunk's logits)."""
    if _C is None:
        return {
            "loaded": False,
            "with_cuda": False,
            "cuda_archs": "",
            "cpu_isa": "",
            "linear_chunk_bytes": 0,
            "error": repr(_LOAD_ERROR),
        }
    return {
        "loaded": True,
        "with_cuda": bool(_C.with_cuda),
        "cuda_archs": str(_C.cuda_archs),
        "cpu_isa": str(_C.cpu_isa()),
        "linear_chunk_bytes": int(_C.linear_chunk_bytes),
        "error": None,
    }


def use_fast_path(op: str, *tensors: Optional[torch.Tensor]) -> bool:
    """True when the native op can run on these tensors' device; otherwise warns once per
    (op, device) and returns False so the caller runs the reference."""
    device = next(t.device for t in tensors if t is not None)
    if _C is not None and (device.type == "cpu" or (device.type == "cuda" and _C.with_cuda)):
        return True
    key = (op, device.type)
    if key not in _WARNED:
        _WARNED.add(key)
        why = f"the extension failed to load ({_LOAD_ERROR})" if _C is None else f"it was built without {device.type}"
        warnings.warn(
            f"alphagrpo_serve.kernels.{op}: no native kernel ({why}); using the PyTorch reference", stacklevel=3
        )
    return False


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


if _C is not None:
    lib = "alphagrpo"

    # ---- fake implementations: shapes and dtypes only -----------------------------------------
    @torch.library.register_fake(f"{lib}::flow_sde_step")
    def _(x, v, v_uncond, cfg_scale, sigma, sigma_next, noise_level, sigma_max, noise):
        b = x.shape[0]
        acc = _acc(x.dtype)
        return torch.empty_like(x), torch.empty_like(x), x.new_empty((b,), dtype=acc), x.new_empty((b,), dtype=acc)

    @torch.library.register_fake(f"{lib}::flow_sde_logprob")
    def _(x, v, x_next, sigma, sigma_next, noise_level, sigma_max):
        return v.new_empty((v.shape[0],), dtype=_acc(v.dtype))

    @torch.library.register_fake(f"{lib}::flow_sde_logprob_backward")
    def _(grad, x, v, x_next, sigma, sigma_next, noise_level, sigma_max, need_grad_x):
        return torch.empty_like(v), (torch.empty_like(x) if need_grad_x else v.new_empty((0,)))

    @torch.library.register_fake(f"{lib}::grpo_advantages")
    def _(rewards, std_scope, eps, clip):
        return rewards.new_empty(rewards.shape, dtype=_acc(rewards.dtype))

    @torch.library.register_fake(f"{lib}::grpo_token_loss")
    def _(
        logits,
        tokens,
        advantages,
        mask,
        old_logp,
        ref_logp,
        temperature,
        eps_low,
        eps_high,
        dual_clip,
        beta,
        ratio_level,
        aggregation,
        compute_grad,
    ):
        acc = _acc(logits.dtype)
        grad = torch.empty_like(logits) if compute_grad else logits.new_empty((0,))
        return (
            logits.new_empty((), dtype=acc),
            logits.new_empty((3,), dtype=acc),
            logits.new_empty(logits.shape[:2], dtype=acc),
            grad,
        )

    @torch.library.register_fake(f"{lib}::grpo_linear_token_loss")
    def _(
        hidden,
        weight,
        bias,
        tokens,
        advantages,
        mask,
        old_logp,
        ref_logp,
        temperature,
        eps_low,
        eps_high,
        dual_clip,
        beta,
        ratio_level,
        aggregation,
        chunk_tokens,
        grad_hidden,
        grad_weight,
        grad_bias,
    ):
        acc = _acc(hidden.dtype)
        empty = hidden.new_empty((0,))
        return (
            hidden.new_empty((), dtype=acc),
            hidden.new_empty((3,), dtype=acc),
            hidden.new_empty(hidden.shape[:2], dtype=acc),
            hidden.new_empty(hidden.shape) if grad_hidden else empty,
            weight.new_empty(weight.shape) if grad_weight else weight.new_empty((0,)),
            bias.new_empty(bias.shape) if grad_bias else empty,
        )

    @torch.library.register_fake(f"{lib}::flow_grpo_loss")
    def _(logp, old_logp, advantages, kl, clip_range, beta):
        acc = _acc(logp.dtype)
        grad_kl = logp.new_empty(logp.shape, dtype=acc) if kl is not None else logp.new_empty((0,), dtype=acc)
        return (
            logp.new_empty((), dtype=acc),
            logp.new_empty((3,), dtype=acc),
            logp.new_empty(logp.shape, dtype=acc),
            grad_kl,
        )

    # ---- autograd ------------------------------------------------------------------------------
    def _logprob_setup(ctx, inputs, output):
        x, v, x_next, sigma, sigma_next, noise_level, sigma_max = inputs
        ctx.save_for_backward(x, v, x_next, sigma, sigma_next)
        ctx.params = (noise_level, sigma_max)

    def _logprob_backward(ctx, grad):
        x, v, x_next, sigma, sigma_next = ctx.saved_tensors
        need_x = ctx.needs_input_grad[0]
        grad_v, grad_x = torch.ops.alphagrpo.flow_sde_logprob_backward(
            grad, x, v, x_next, sigma, sigma_next, *ctx.params, need_x
        )
        return (grad_x if need_x else None), grad_v, None, None, None, None, None

    torch.library.register_autograd(f"{lib}::flow_sde_logprob", _logprob_backward, setup_context=_logprob_setup)

    def _can_read_value(t: torch.Tensor) -> bool:
        if type(t) is not torch.Tensor or torch.compiler.is_compiling():
            return False
        return not (t.is_cuda and torch.cuda.is_current_stream_capturing())

    def _token_loss_setup(ctx, inputs, output):
        # without this, autograd would zero-fill a logits-sized "gradient" of the grad_logits output
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(output[3])
        ctx.mark_non_differentiable(output[1], output[2], output[3])

    def _token_loss_backward(ctx, grad_loss, *_unused):
        (grad_logits,) = ctx.saved_tensors
        if grad_loss is None:
            return (None,) * 14
        if grad_logits.numel() == 0:
            raise RuntimeError(
                "grpo_token_loss was called with compute_grad=False; call it with compute_grad=True "
                "(the Python wrapper does this when logits require grad)"
            )
        # The usual caller backpropagates 1.0 from the loss: hand back the saved buffer itself rather
        # than a second logits-sized copy. The check reads one scalar, so it runs only on plain eager
        # tensors (not under tracing, fake tensors or CUDA-graph capture).
        if _can_read_value(grad_loss) and bool(grad_loss == 1):
            return (grad_logits,) + (None,) * 13
        return (grad_logits * grad_loss.to(grad_logits.dtype),) + (None,) * 13

    torch.library.register_autograd(f"{lib}::grpo_token_loss", _token_loss_backward, setup_context=_token_loss_setup)

    def _linear_loss_setup(ctx, inputs, output):
        # the gradients were computed in the forward's chunk loop (the logits are gone by now)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(output[3], output[4], output[5])
        ctx.mark_non_differentiable(*output[1:])
        ctx.computed = inputs[16:19]  # grad_hidden, grad_weight, grad_bias

    _LINEAR_FLAGS = ("grad_hidden", "grad_weight", "grad_bias")

    def _linear_loss_backward(ctx, grad_loss, *_unused):
        if grad_loss is None:
            return (None,) * 19
        grads = []
        for i, g in enumerate(ctx.saved_tensors):  # hidden, weight, bias
            if not ctx.needs_input_grad[i]:
                grads.append(None)
                continue
            if not ctx.computed[i]:
                raise RuntimeError(
                    f"grpo_linear_token_loss was called with {_LINEAR_FLAGS[i]}=False; call it with "
                    f"{_LINEAR_FLAGS[i]}=True (the Python wrapper does this when the tensor requires grad)"
                )
            # as for grpo_token_loss: hand back the buffers themselves when the upstream gradient is 1
            grads.append(g if _can_read_value(grad_loss) and bool(grad_loss == 1) else g * grad_loss.to(g.dtype))
        return (*grads, *(None,) * 16)

    torch.library.register_autograd(
        f"{lib}::grpo_linear_token_loss", _linear_loss_backward, setup_context=_linear_loss_setup
    )

    def _flow_loss_setup(ctx, inputs, output):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(output[2], output[3])
        ctx.mark_non_differentiable(output[1], output[2], output[3])
        ctx.has_kl = inputs[3] is not None

    def _flow_loss_backward(ctx, grad_loss, *_unused):
        grad_logp, grad_kl = ctx.saved_tensors
        if grad_loss is None:
            return (None,) * 6
        g_kl = grad_kl * grad_loss if ctx.has_kl else None
        return grad_logp * grad_loss, None, None, g_kl, None, None

    torch.library.register_autograd(f"{lib}::flow_grpo_loss", _flow_loss_backward, setup_context=_flow_loss_setup)
