"""The product on a GPU (run by benchmarks/gpu_check.sh; skipped without CUDA): the tiny UMM served on
cuda answers a Generate with the project's CUDA kernels in the sampling path, takes an
UpdateWeights, and a trainer step on cuda recomputes the served log-probs."""

import asyncio
import os

import pytest
import torch

from alphagrpo_serve import kernels as K
from alphagrpo_serve.client import AsyncClient
from alphagrpo_serve.models.registry import load_policy
from alphagrpo_serve.server.app import ServeConfig, Server

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or not K.build_info()["with_cuda"],
        reason="needs CUDA and an extension built with CUDA",
    ),
]


def test_tiny_umm_serves_updates_and_trains_on_cuda(tmp_path):
    from alphagrpo_trainer.config import load_config
    from alphagrpo_trainer.train import Trainer

    policy = load_policy("tiny", None, "cuda", "bfloat16")
    assert policy.info.device.type == "cuda" and policy.info.dtype == torch.bfloat16

    async def serve_and_call():
        # KServe off: the GPU machine may lack tritonclient; the native path is what this checks
        server = Server(ServeConfig(host="127.0.0.1", port=0, kserve=False), policy=policy)
        port = await server.start()
        try:
            async with AsyncClient(f"127.0.0.1:{port}") as c:
                with torch.profiler.profile(
                    activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
                ) as prof:
                    out = await c.generate(
                        ["a red circle"],
                        group_size=4,
                        mode="sde",
                        steps=6,
                        sde_window=(1, 3),
                        think=True,
                        return_trajectory=True,
                    )
                # the op's CPU record is seen only on the profiling thread (the model runs on the
                # server's own thread); its CUDA kernels are seen device-wide, and sde_step_kernel is
                # launched by flow_sde_step alone
                names = {e.name for e in prof.events()}
                assert any("alphagrpo::flow_sde_step" in n or "alphagrpo::dev::sde_step_kernel" in n for n in names), (
                    sorted(n for n in names if "alpha" in n)
                )
                assert len(out) == 4 and out[0].trajectory.image.latents.dtype == torch.float32
                w = policy.export_weights()
                name = next(n for n in w if n.endswith("qkv.weight"))
                assert w[name].dtype == torch.bfloat16  # tensors on the wire keep their dtype
                v = await c.update_weights({name: w[name] * 0.5})
                assert v == 1 and torch.equal(policy.export_weights()[name].cpu(), (w[name] * 0.5).cpu())
                return f"127.0.0.1:{port}"
        finally:
            await server.stop(grace=1.0)

    asyncio.run(serve_and_call())

    # one trainer step with the trainer's policy on cuda against a server subprocess on cuda
    from alphagrpo_trainer.servers import LocalServer

    server = LocalServer(
        {"name": "tiny", "path": None}, extra_args=["--no-kserve"], device="cuda", log_path=str(tmp_path / "server.log")
    )
    try:
        cfg = load_config(
            None,
            dict(
                task="rt2i",
                group_size=4,
                prompts_per_step=2,
                steps=6,
                sde_window_size=2,
                sde_window_range=[0, 6],
                max_thought_tokens=8,
                max_steps=1,
                lr=1e-5,
                device="cuda",
                out_dir=str(tmp_path / "run"),
            ),
        )
        tr = Trainer(cfg, [server.address], progress=False, log=lambda *a: None)
        try:
            tr.sync_servers(force=True)
            m = tr.train_step()
            assert all(p.device.type == "cuda" and p.grad is not None for p in tr.params)
            # float32 weights on both sides: the recompute equals the served record to float32 rounding
            assert m["image_logp_dev"] < 1e-3 and m["text_logp_dev"] < 1e-3, m
        finally:
            tr.close()
    finally:
        server.stop()
    assert os.path.exists(tmp_path / "server.log")
