#!/usr/bin/env bash
# BAGEL on CUDA (gpu_check.sh runs it; or alone, about a minute): a tiny random BAGEL in the official
# layout served with `alphagrpo serve --policy bagel --device cuda --dtype bfloat16`: GetModelInfo,
# Generate (think, trajectories), Reflect, UpdateWeights (full by official names, LoRA); then one
# GRPO step of `alphagrpo train` (RT2I, LoRA, the trainer's policy on cuda in bfloat16) against it,
# which must change the served version; and in-process on cuda in float32, the recompute of a
# Generate against its record (token and step log-probs). Writes into ${OUT:-benchmarks/out}.
# DEVICE=cpu runs the same script on the CPU (how it was checked on a machine without a GPU).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-benchmarks/out}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
export DEVICE=${DEVICE:-cuda}
export PYTHONPATH="$PWD:$PWD/trainer:$PWD/tools${PYTHONPATH:+:$PYTHONPATH}"
export OUT_DIR
$PY - <<'EOF'
import json, os, subprocess, sys, time

import torch
import yaml

import make_tiny_bagel
from alphagrpo_serve.client import Client
from alphagrpo_serve.kernels import flow_sde_logprob
from alphagrpo_serve.models.bagel.policy import BagelPolicy
from alphagrpo_trainer.servers import LocalServer

dev, out = os.environ["DEVICE"], os.environ["OUT_DIR"]
path = make_tiny_bagel.write(os.path.join(out, "tiny_bagel"), seed=0)
ok = True

# in-process, float32: the recompute equals the record
pol = BagelPolicy.load(path, device=dev, dtype=torch.float32)
sc = pol.resolve_sampling(dict(steps=6, mode="sde", sde_window=(1, 3)))
text = pol.resolve_text(dict(max_tokens=8))
samples = pol.generate(["a red circle"] * 2 + ["a blue square to the left of a yellow triangle"], [0, 1, 2], sc, text,
                       think=True)
with torch.no_grad():
    lp = pol.token_logps(samples).cpu()
    tdev = max(float((lp[i, :len(s.text.ids)] - torch.tensor(s.text.logps)).abs().max()) for i, s in enumerate(samples))
    idev = 0.0
    for k in range(3):
        v = pol.guided_velocity(samples, k).cpu()
        for i, s in enumerate(samples):
            tr = s.trajectory
            rec = flow_sde_logprob(tr.latents[k:k + 1], v[i:i + 1], tr.latents[k + 1:k + 2], float(tr.sigmas[k]),
                                   float(tr.sigma_nexts[k]), noise_level=sc.noise_level, sigma_max=tr.sigma_max)
            idev = max(idev, abs(rec.item() - tr.log_probs[k].item()))
print(f"float32 on {dev}: recompute - record: text {tdev:.2e}, image steps {idev:.2e} (float32 CPU: <= 1e-5)")
ok &= tdev < 1e-4 and idev < 1e-4
del pol

# served in bfloat16
server = LocalServer({"name": "bagel", "path": path}, extra_args=["--task", "shapes"], device=dev, dtype="bfloat16",
                     log_path=os.path.join(out, "gpu_bagel_server.log"), start_timeout_s=300)
try:
    local = BagelPolicy.load(path, device=dev, dtype=torch.bfloat16)
    with Client(server.address, timeout=300) as c:
        info = c.model_info()
        print(f"served: {info.name} on {info.device} in {info.dtype}, {info.parameter_count} parameters")
        ok &= info.device.startswith(dev) and info.dtype == "bfloat16"
        t = time.perf_counter()
        got = c.generate(["a red circle", "three green triangles"], group_size=4, seed=1, steps=16, think=True,
                         max_thought_tokens=16, mode="sde", sde_window=(0, 10), return_trajectory=True)
        print(f"Generate 2 prompts x G=4, think, 16 steps: {time.perf_counter() - t:.2f} s")
        t = time.perf_counter()
        ref = c.reflect(["a red circle"], [got[0].image], group_size=4, seed=2, steps=16, max_thought_tokens=16,
                        mode="sde", sde_window=(0, 10), return_trajectory=True)
        print(f"Reflect 1 x G=4: {time.perf_counter() - t:.2f} s; images {ref[0].image.shape}")
        v0 = c.model_info().policy_version
        v1 = c.update_weights(local.export_weights())
        local.enable_lora(8, 16.0)
        v2 = c.update_weights(local.export_weights(lora=True), lora=True)
        print(f"UpdateWeights: full -> version {v1}, LoRA -> version {v2}")
        ok &= v2 == v0 + 2
    # one GRPO step with the trainer's policy on the device
    run = os.path.join(out, "gpu_bagel_train")
    cfg = dict(task="rt2i", group_size=4, prompts_per_step=2, steps=8, sde_window_size=4, sde_window_range=[0, 8],
               max_thought_tokens=8, max_steps=1, eval_final_limit=1, eval_steps=4, eval_srr=False, lr=1e-4,
               lora_rank=8, lora_alpha=16.0, policy={"name": "bagel", "path": path}, device=dev, dtype="bfloat16",
               prompt_task="shapes", out_dir=run)
    with open(os.path.join(out, "gpu_bagel_train.yaml"), "w") as f:
        yaml.safe_dump(cfg, f)
    res = subprocess.run([sys.executable, "-m", "alphagrpo_serve.cli", "train", "--config",
                          os.path.join(out, "gpu_bagel_train.yaml"), "--server", server.address, "--no-progress"],
                         capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        print(res.stderr[-3000:])
        ok = False
    else:
        row = json.loads(open(os.path.join(run, "metrics.jsonl")).readline())
        with Client(server.address) as c:
            v3 = c.model_info().policy_version
        print(f"train step on {dev} (bfloat16): loss {row['loss']:.4g}, recompute - record: image "
              f"{row['image_logp_dev']:.2e}, text {row['text_logp_dev']:.2e}; served version {v2} -> {v3}")
        ok &= v3 > v2
finally:
    server.stop()
print("gpu_bagel:", "ok" if ok else "FAILED")
sys.exit(0 if ok else 1)
EOF
