"""dpag_engine: train and serve Action-Guided Diffusion Policies (DP-AG) on real robot arms.

dpag_engine/ is the Python package: config, model, diffusion, guidance, losses, policy, data and
training. The hot ops dispatch through `dpag_engine.ops` to the PyTorch reference, the C++ runtime
(`dpag_engine._C`, from csrc/ + python/) or the Triton kernels (`dpag_engine.kernels`, from kernels/).

`import dpag_engine` imports nothing else: the top-level names load on first use (PEP 562), so a
process that needs only a torch-free part (the controller emulator `python -m dpag_engine.ursim`,
the kinematics) does not pay for torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import PolicyConfig
    from .policy import DPAGPolicy

# top-level name -> the submodule that defines it
_LAZY = {"DPAGPolicy": ".policy", "PolicyConfig": ".config"}

__all__ = ["DPAGPolicy", "PolicyConfig"]
__version__ = "0.1.0"


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value     # later look-ups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
