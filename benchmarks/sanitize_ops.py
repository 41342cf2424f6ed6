"""Calls every CUDA op once on small, odd-sized inputs (forward and backward): the workload that
benchmarks/gpu_check.sh runs under compute-sanitizer --tool memcheck."""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from alphagrpo_serve import kernels as K  # noqa: E402


def main():
    dev = "cuda"
    for dtype in (torch.float32, torch.bfloat16):
        for shape in ((3, 7, 33), (2, 4, 16, 16)):  # unaligned (scalar path) and aligned (16-byte path)
            x = torch.randn(shape, device=dev, dtype=dtype)
            v, n, vu = torch.randn_like(x), torch.randn_like(x), torch.randn_like(x)
            out = K.flow_sde_step(x, v, 0.8, 0.6, noise=n, v_uncond=vu, cfg_scale=3.0)
            vq = v.clone().requires_grad_()
            xq = x.clone().requires_grad_()
            K.flow_sde_logprob(xq, vq, out.x_next, 0.8, 0.6).sum().backward()
        for V in (33, 4096):
            logits = torch.randn(2, 5, V, device=dev, dtype=dtype, requires_grad=True)
            tokens = torch.randint(0, V, (2, 5), device=dev)
            for level in ("token", "sequence"):
                o = K.grpo_token_loss(
                    logits,
                    tokens,
                    torch.randn(2, device=dev),
                    torch.ones(2, 5, device=dev),
                    old_logp=torch.full((2, 5), -3.0, device=dev),
                    ref_logp=torch.full((2, 5), -3.0, device=dev),
                    beta=0.1,
                    ratio_level=level,
                )
                o.loss.backward()
    K.grpo_advantages(torch.rand(37, 5, device=dev), "group", clip=2.0)
    lp = torch.randn(5, 3, device=dev, requires_grad=True)
    K.flow_grpo_loss(
        lp, lp.detach() + 0.01, torch.randn(5, device=dev), kl=torch.rand(5, 3, device=dev), beta=0.1
    ).loss.backward()
    torch.cuda.synchronize()
    print("sanitize_ops: every op ran")


if __name__ == "__main__":
    main()
