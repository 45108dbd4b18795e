"""`python -m tsv_fast.info`: what was built, for which torch/CUDA, and which backends can run."""
from __future__ import annotations

import importlib.metadata
import json
import platform


def collect() -> dict:
    import torch

    from . import __version__
    from .backends import available_backends
    from .backends.cusolver import build_info

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return {
        "tsv_fast": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "triton": version("triton"),
        "scipy": version("scipy"),
        "extension_build": build_info() or "no build record (source tree or pure-Python install)",
        "backends": {device: {name: reasons or "available" for name, reasons in available_backends(device).items()}
                     for device in devices},
    }


def main() -> None:
    print(json.dumps(collect(), indent=2, default=str))


if __name__ == "__main__":
    main()
