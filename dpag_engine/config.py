"""One dataclass config for a DP-AG (or plain Diffusion Policy) policy.

Every field is validated at construction, and an invalid value fails with a message that names the
field, so a typo in a YAML file is caught before any tensor is allocated.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """An invalid configuration value; the message names the offending field."""


def require(ok: bool, name: str, message: str) -> None:
    """Fail with a ConfigError whose message starts with the field's dotted name."""
    if not ok:
        raise ConfigError(f"{name}: {message}")


@dataclass(frozen=True)
class UNetConfig:
    """Conditional 1-D temporal U-Net (Diffusion Policy's ConditionalUnet1D), docs/method.md §3."""

    down_dims: tuple[int, ...] = (256, 512, 1024)
    kernel_size: int = 5
    diffusion_step_embed_dim: int = 256
    n_groups: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "down_dims", tuple(int(d) for d in self.down_dims))
        require(len(self.down_dims) >= 1, "unet.down_dims", "needs at least one level")
        for d in self.down_dims:
            require(d > 0 and d % self.n_groups == 0, "unet.down_dims",
                     f"every width must be a positive multiple of unet.n_groups={self.n_groups}, got {d}")
        require(self.kernel_size % 2 == 1 and self.kernel_size > 0, "unet.kernel_size",
                 f"must be a positive odd number (same-length convolution), got {self.kernel_size}")
        require(self.diffusion_step_embed_dim > 0 and self.diffusion_step_embed_dim % 2 == 0,
                 "unet.diffusion_step_embed_dim", "must be a positive even number (sin/cos halves)")


# The two recipes of the spec; "small" (4.5 M parameters), sized to learn on a 2-core CPU in
# minutes; and a tiny one that keeps tests fast.
UNET_RECIPES: dict[str, UNetConfig] = {
    "lowdim": UNetConfig(down_dims=(256, 512, 1024), kernel_size=5, diffusion_step_embed_dim=256),
    "image": UNetConfig(down_dims=(512, 1024, 2048), kernel_size=5, diffusion_step_embed_dim=128),
    "small": UNetConfig(down_dims=(64, 128, 256), kernel_size=5, diffusion_step_embed_dim=128),
    "tiny": UNetConfig(down_dims=(32, 64), kernel_size=3, diffusion_step_embed_dim=32),
}


@dataclass(frozen=True)
class ImageEncoderConfig:
    """Per-camera conv trunk (GroupNorm) + spatial softmax + Linear (docs/method.md §2).

    backbone "resnet18" is the paper's (11 M parameters a camera); "small" is a 4-layer CNN of
    ~0.1 M that trains on a 2-core CPU in minutes at 64x64 (dpag_engine/model/encoders.py)."""

    cameras: tuple[str, ...] = ("image",)
    image_shape: tuple[int, int, int] = (3, 96, 96)  # C, H, W of the stored images, values in [0, 1]
    crop_shape: tuple[int, int] = (84, 84)           # random crop in training, centre crop in eval
    num_keypoints: int = 32
    feature_dim: int = 64                            # per camera
    backbone: str = "resnet18"                       # or "small"

    def __post_init__(self) -> None:
        require(self.backbone in ("resnet18", "small"), "image.backbone",
                f"must be 'resnet18' or 'small', got {self.backbone!r}")
        object.__setattr__(self, "cameras", tuple(self.cameras))
        object.__setattr__(self, "image_shape", tuple(int(s) for s in self.image_shape))
        object.__setattr__(self, "crop_shape", tuple(int(s) for s in self.crop_shape))
        require(len(self.cameras) >= 1 and len(set(self.cameras)) == len(self.cameras),
                 "image.cameras", "needs at least one camera and unique names")
        require(len(self.image_shape) == 3 and min(self.image_shape) > 0, "image.image_shape",
                 f"must be (C, H, W) with positive sizes, got {self.image_shape}")
        require(len(self.crop_shape) == 2
                 and 0 < self.crop_shape[0] <= self.image_shape[1]
                 and 0 < self.crop_shape[1] <= self.image_shape[2],
                 "image.crop_shape", f"must fit inside image_shape {self.image_shape[1:]}, got {self.crop_shape}")
        require(self.num_keypoints > 0, "image.num_keypoints", "must be positive")
        require(self.feature_dim > 0, "image.feature_dim", "must be positive")


@dataclass(frozen=True)
class SchedulerConfig:
    """DDPM training schedule and the inference sampler (docs/method.md §4)."""

    num_train_timesteps: int = 100
    beta_schedule: str = "squaredcos_cap_v2"  # or "linear"
    beta_start: float = 1e-4                   # used by "linear" only
    beta_end: float = 2e-2
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    sampler: str = "ddim"                      # "ddim" (K steps) or "ddpm" (all T steps)
    num_inference_steps: int = 16              # K, for ddim
    eta: float = 0.0                           # DDIM stochasticity
    # DDIM: re-derive epsilon from the clipped x0 (keeps the step consistent with the clip).
    # Diffusion Policy leaves this off (diffusers' default), so do we.
    use_clipped_eps: bool = False

    def __post_init__(self) -> None:
        require(self.num_train_timesteps >= 2, "scheduler.num_train_timesteps", "must be >= 2")
        require(self.beta_schedule in ("squaredcos_cap_v2", "linear"), "scheduler.beta_schedule",
                 f"must be 'squaredcos_cap_v2' or 'linear', got {self.beta_schedule!r}")
        require(self.sampler in ("ddim", "ddpm"), "scheduler.sampler",
                 f"must be 'ddim' or 'ddpm', got {self.sampler!r}")
        require(1 <= self.num_inference_steps <= self.num_train_timesteps,
                 "scheduler.num_inference_steps",
                 f"must be in [1, num_train_timesteps={self.num_train_timesteps}], got {self.num_inference_steps}")
        require(self.eta >= 0.0, "scheduler.eta", "must be >= 0")
        require(self.clip_sample_range > 0.0, "scheduler.clip_sample_range", "must be > 0")


@dataclass(frozen=True)
class LatentUpdateConfig:
    """Euler-Maruyama action-guided latent update (docs/method.md §5). Defaults = released code."""

    steps: int = 1         # S
    dt: float = 1.0
    gamma: float = 1.0
    eta: float = 0.0       # Brownian noise scale
    normalize: bool = True  # unit-L2 normalise the force over the feature dim

    def __post_init__(self) -> None:
        require(self.steps >= 1, "latent.steps", f"must be >= 1, got {self.steps}")
        require(self.dt > 0.0, "latent.dt", f"must be > 0, got {self.dt}")
        require(self.eta >= 0.0, "latent.eta", f"must be >= 0, got {self.eta}")


@dataclass(frozen=True)
class LossConfig:
    """Training loss weights (docs/method.md §6)."""

    target_scale: float = 1.0   # released code: 1/0.4
    tau: float = 0.8            # InfoNCE temperature
    lambda_cont: float = 1.0
    lambda_kl: float = 1.0
    # The KL's prior: "standard" N(0, I) (released code) or "observation" N(features, I) (the paper's
    # N(z, I) around the observed latent: an MLP posterior keeps the observation instead of shrinking
    # mu to zero; for the identity posterior mu = features and only the variance term remains).
    kl_prior: str = "standard"
    # Weight of a second diffusion loss on the guided latent, eps_theta(a_k, k, z~) vs the noise
    # (0: released code, the guided branch is only a detached target). Trains the noise predictor to
    # be right where guided sampling conditions it.
    lambda_diff_guided: float = 0.0
    implementation: str = "efficient"  # or "literal" (mirrors the released code; slower)

    def __post_init__(self) -> None:
        require(self.tau > 0.0, "loss.tau", f"must be > 0, got {self.tau}")
        require(self.lambda_cont >= 0.0, "loss.lambda_cont", "must be >= 0")
        require(self.lambda_kl >= 0.0, "loss.lambda_kl", "must be >= 0")
        require(self.kl_prior in ("standard", "observation"), "loss.kl_prior",
                 f"must be 'standard' or 'observation', got {self.kl_prior!r}")
        require(self.lambda_diff_guided >= 0.0, "loss.lambda_diff_guided", "must be >= 0")
        require(self.implementation in ("efficient", "literal"), "loss.implementation",
                 f"must be 'efficient' or 'literal', got {self.implementation!r}")


@dataclass(frozen=True)
class PolicyConfig:
    """Everything needed to build a policy and reproduce its numbers."""

    action_dim: int = 2              # Da
    state_dim: int = 20              # low-dim observation features per step (0 for image-only)
    n_obs_steps: int = 2             # To
    horizon: int = 16                # H
    n_action_steps: int = 8          # Na
    method: str = "dpag"             # "dpag" or "dp" (plain Diffusion Policy: no posterior/VJP/InfoNCE/KL)
    posterior: str = "identity"      # "identity" (released code: mu = features) or "mlp"
    inference_mode: str = "dp"       # "dp" (condition on mu) or "guided" (latent update each step)
    recipe: str = "lowdim"           # name in UNET_RECIPES, or "custom" to use `unet` as given
    unet: UNetConfig = field(default_factory=UNetConfig)
    image: ImageEncoderConfig | None = None
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    latent: LatentUpdateConfig = field(default_factory=LatentUpdateConfig)   # training's update (the loss)
    # Guided sampling's update at inference, apart from training's: gamma = 1 moves the latent by
    # sigma (~1, half the distance between two observations) per denoising step and cost most of
    # the reach task's success; 0.1 was fine on the reach task but cut Push-T's coverage from 0.85
    # to 0.70; 0.01 was within noise of dp sampling on both (bench/PUSHT.md, "Guided mode").
    guidance: LatentUpdateConfig = field(default_factory=lambda: LatentUpdateConfig(gamma=0.01))
    loss: LossConfig = field(default_factory=LossConfig)

    def __post_init__(self) -> None:
        if self.recipe != "custom":
            require(self.recipe in UNET_RECIPES, "recipe",
                     f"must be one of {sorted(UNET_RECIPES)} or 'custom', got {self.recipe!r}")
            object.__setattr__(self, "unet", UNET_RECIPES[self.recipe])
        require(self.action_dim >= 1, "action_dim", f"must be >= 1, got {self.action_dim}")
        require(self.state_dim >= 0, "state_dim", f"must be >= 0, got {self.state_dim}")
        require(self.state_dim > 0 or self.image is not None, "state_dim",
                 "must be > 0 when there is no image encoder (the policy would see nothing)")
        require(self.n_obs_steps >= 1, "n_obs_steps", f"must be >= 1, got {self.n_obs_steps}")
        # The down path halves the horizon at every level but the last.
        factor = 2 ** (len(self.unet.down_dims) - 1)
        require(self.horizon >= 1 and self.horizon % factor == 0, "horizon",
                 f"must be a positive multiple of 2**(levels-1)={factor} for unet.down_dims "
                 f"{self.unet.down_dims}, got {self.horizon}")
        require(1 <= self.n_action_steps <= self.horizon - self.n_obs_steps + 1, "n_action_steps",
                 f"must be in [1, horizon - n_obs_steps + 1 = {self.horizon - self.n_obs_steps + 1}], "
                 f"got {self.n_action_steps}")
        require(self.method in ("dpag", "dp"), "method", f"must be 'dpag' or 'dp', got {self.method!r}")
        require(self.posterior in ("identity", "mlp"), "posterior",
                 f"must be 'identity' or 'mlp', got {self.posterior!r}")
        require(self.inference_mode in ("dp", "guided"), "inference_mode",
                 f"must be 'dp' or 'guided', got {self.inference_mode!r}")
        require(not (self.method == "dp" and self.inference_mode == "guided"), "inference_mode",
                 "'guided' needs method='dpag' (a plain DP model has no posterior to guide)")

    @property
    def obs_feature_dim(self) -> int:
        """Do: per-step feature size (camera features then low-dim state)."""
        cams = 0 if self.image is None else len(self.image.cameras) * self.image.feature_dim
        return cams + self.state_dim

    @property
    def global_cond_dim(self) -> int:
        return self.n_obs_steps * self.obs_feature_dim

    def replace(self, **changes: Any) -> "PolicyConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of builtins (lists, not tuples), safe for JSON and `torch.load(weights_only=True)`."""
        def plain(v: Any) -> Any:
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)):
                return [plain(x) for x in v]
            return v
        return plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PolicyConfig":
        """Inverse of `to_dict`; unknown keys fail with their name (no silent typos)."""
        values = checked_fields(cls, d)
        for key, sub in POLICY_SECTIONS.items():
            if isinstance(values.get(key), dict):
                values[key] = sub(**values[key])
        return cls(**values)


# PolicyConfig fields that are configs of their own.
POLICY_SECTIONS = {"unet": UNetConfig, "image": ImageEncoderConfig, "scheduler": SchedulerConfig,
                   "latent": LatentUpdateConfig, "guidance": LatentUpdateConfig, "loss": LossConfig}


def checked_fields(cls: type, values: Any, where: str = "") -> dict[str, Any]:
    """Check a mapping against a config dataclass before constructing it: unknown fields fail with
    their dotted name, and scalars are checked against the field's annotated type (see `_scalar`).
    PolicyConfig's sub-configs are checked too. Ranges are the dataclasses' own __post_init__ checks."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where or cls.__name__}: must be a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    out = {}
    for k, v in values.items():
        name = f"{where}.{k}" if where else k
        if k not in hints:
            raise ConfigError(f"{name}: unknown field of {cls.__name__} (known: {', '.join(sorted(hints))})")
        v = _scalar(v, hints[k], name)
        sub = POLICY_SECTIONS.get(k) if cls is PolicyConfig else None
        if sub is not None and isinstance(v, dict):
            v = checked_fields(sub, v, name)
        out[k] = v
    return out


def latent_overrides(base: LatentUpdateConfig, text: str, where: str = "--guidance") -> LatentUpdateConfig:
    """`base` with the fields of "gamma=0.1,steps=2,eta=0" (the evaluators' --guidance): guided
    sampling's latent update chosen at inference, apart from the one the model was trained with."""
    import json
    values: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, raw = item.partition("=")
        require(bool(sep), where, f"expected key=value pairs separated by commas, got {item!r}")
        try:
            values[key.strip()] = json.loads(raw.strip())   # 2 -> int, 0.1 -> float, true -> bool
        except json.JSONDecodeError:
            raise ConfigError(f"{where}.{key.strip()}: expected a number or true/false, got {raw.strip()!r}") from None
    return dataclasses.replace(base, **checked_fields(LatentUpdateConfig, values, where))


def _scalar(value: Any, hint: Any, name: str) -> Any:
    """A value for a field annotated bool, int, float or str (or Optional of one); others pass through.
    Text-file spellings convert (YAML reads `1e-4` as a string, TOML may give 1 for 1.0); a bool is
    never a number, a fractional number never an int, and a float must be finite (JSON reads 1e400
    as inf, which would train on NaNs)."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None and type(None) in options:
        return None
    kind = next((t for t in options if t in (bool, int, float, str)), None)
    if kind is None:
        return value
    if kind is bool or kind is str:
        require(isinstance(value, kind), name, f"expected {'true or false' if kind is bool else 'a string'}, got {value!r}")
        return value
    wanted = "an integer" if kind is int else "a number"
    require(isinstance(value, (int, float, str)) and not isinstance(value, bool), name, f"expected {wanted}, got {value!r}")
    if kind is int:
        require(isinstance(value, int) or (isinstance(value, float) and value.is_integer()), name,
                f"expected an integer, got {value!r}")
        return int(value)
    try:
        value = float(value)
    except (ValueError, OverflowError):
        raise ConfigError(f"{name}: expected a number, got {value!r}") from None
    require(math.isfinite(value), name, f"must be a finite number, got {value}")
    return value
