"""dpag_engine: train and serve Action-Guided Diffusion Policies (DP-AG) on real robot arms.

dpag_engine/ is the Python package: config, model, diffusion, guidance, losses, policy, data and
training. The hot ops dispatch through `dpag_engine.ops` to the PyTorch reference, the C++ runtime
(`dpag_engine._C`, from csrc/ + python/) or the Triton kernels (`dpag_engine.kernels`, from kernels/).
"""
from .config import PolicyConfig
from .policy import DPAGPolicy

__all__ = ["DPAGPolicy", "PolicyConfig"]
__version__ = "0.1.0"
