"""Generates the Python gRPC stubs from protos/ into alphagrpo_serve/_proto/ (run by `make build`
and setup.py; never edit the output). protoc writes imports as `from alphagrpo.v1 import ...`;
they are rewritten to the package path `alphagrpo_serve._proto.alphagrpo.v1`.

    python tools/gen_protos.py [--out DIR]
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROTOS = os.path.join(ROOT, "protos")
PACKAGE = "alphagrpo_serve._proto"


def generate(out: str) -> list:
    from grpc_tools import protoc

    files = sorted(glob.glob(os.path.join(PROTOS, "alphagrpo", "v1", "*.proto")))
    if not files:
        raise SystemExit(f"no .proto files under {PROTOS}")
    os.makedirs(out, exist_ok=True)
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    rc = protoc.main(
        ["protoc", f"-I{PROTOS}", f"-I{include}", f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}"]
        + files
    )
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")
    written = []
    for path in sorted(glob.glob(os.path.join(out, "alphagrpo", "v1", "*.py*"))):
        with open(path) as f:
            text = f.read()
        text = re.sub(r"^from alphagrpo\.v1 import", f"from {PACKAGE}.alphagrpo.v1 import", text, flags=re.M)
        with open(path, "w") as f:
            f.write(text)
        written.append(path)
    for d in (out, os.path.join(out, "alphagrpo"), os.path.join(out, "alphagrpo", "v1")):
        open(os.path.join(d, "__init__.py"), "a").close()
    return written


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "alphagrpo_serve", "_proto"), help="output folder")
    args = p.parse_args(argv)
    for path in generate(args.out):
        print(os.path.relpath(path, ROOT))


if __name__ == "__main__":
    sys.exit(main())
