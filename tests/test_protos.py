"""The gRPC stubs are generated from protos/ and must match them."""

import filecmp
import glob
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_generated_stubs_are_fresh(tmp_path):
    subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "gen_protos.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    fresh = sorted(os.path.relpath(p, tmp_path) for p in glob.glob(str(tmp_path / "alphagrpo" / "v1" / "*.py*")))
    assert fresh, "protoc produced nothing"
    pkg = os.path.join(ROOT, "alphagrpo_serve", "_proto")
    for rel in fresh:
        ours = os.path.join(pkg, rel)
        assert os.path.exists(ours), f"{rel} missing: run `make build` (tools/gen_protos.py)"
        assert filecmp.cmp(ours, tmp_path / rel, shallow=False), (
            f"{rel} is stale: run `make build` (tools/gen_protos.py)"
        )


def test_every_field_is_documented():
    """Every field, enum value and rpc has a comment above it; consecutive fields may share one
    (e.g. a low/high pair). Requests without fields are exempt."""
    import re

    item = re.compile(r"^\s*((repeated |optional )?[\w.]+ \w+ = \d+;|rpc \w+|[A-Z_]+ = \d+;)")
    missing = []
    for path in sorted(glob.glob(os.path.join(ROOT, "protos", "alphagrpo", "v1", "*.proto"))):
        lines = open(path).read().splitlines()
        for i, line in enumerate(lines):
            if not item.match(line):
                continue
            j = i - 1
            while j >= 0 and item.match(lines[j]):
                j -= 1
            if j < 0 or not lines[j].strip().startswith("//"):
                missing.append(f"{os.path.basename(path)}:{i + 1}: {line.strip()}")
    assert not missing, "undocumented proto fields:\n" + "\n".join(missing)


def test_messages_round_trip():
    from alphagrpo_serve._proto.alphagrpo.v1 import common_pb2, policy_pb2, reward_pb2

    req = policy_pb2.GenerateRequest(
        prompts=["a red circle"],
        group_size=4,
        seed=7,
        params=policy_pb2.SamplingParams(mode=policy_pb2.SAMPLING_MODE_SDE, steps=20),
    )
    assert policy_pb2.GenerateRequest.FromString(req.SerializeToString()) == req
    t = common_pb2.Tensor(dtype="float32", shape=[2, 3], data=bytes(24))
    assert common_pb2.Tensor.FromString(t.SerializeToString()).shape == [2, 3]
    assert reward_pb2.VerifyRequest(items=[reward_pb2.VerifyItem(prompt="a square")]).items[0].prompt == "a square"
