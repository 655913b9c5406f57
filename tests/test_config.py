import pytest

from dpag_engine.config import (UNET_RECIPES, ConfigError, ImageEncoderConfig, LatentUpdateConfig, LossConfig,
                                PolicyConfig, SchedulerConfig, UNetConfig)


def test_named_recipes_match_the_spec():
    assert UNET_RECIPES["lowdim"] == UNetConfig(down_dims=(256, 512, 1024), kernel_size=5, diffusion_step_embed_dim=256)
    assert UNET_RECIPES["image"] == UNetConfig(down_dims=(512, 1024, 2048), kernel_size=5, diffusion_step_embed_dim=128)
    assert PolicyConfig(recipe="image").unet.down_dims == (512, 1024, 2048)


def test_defaults_are_the_released_code():
    cfg = PolicyConfig()
    assert (cfg.n_obs_steps, cfg.horizon, cfg.n_action_steps) == (2, 16, 8)
    assert cfg.scheduler.num_train_timesteps == 100 and cfg.scheduler.beta_schedule == "squaredcos_cap_v2"
    assert cfg.latent == LatentUpdateConfig(steps=1, dt=1.0, gamma=1.0, eta=0.0, normalize=True)   # training: released code
    assert cfg.guidance == LatentUpdateConfig(steps=1, dt=1.0, gamma=0.01, eta=0.0, normalize=True)  # inference: measured
    assert cfg.loss.tau == 0.8 and cfg.loss.target_scale == 1.0
    assert cfg.global_cond_dim == 40


@pytest.mark.parametrize("make, field", [
    (lambda: PolicyConfig(recipe="tiny", horizon=15), "horizon"),
    (lambda: PolicyConfig(recipe="lowdim", horizon=10), "horizon"),
    (lambda: PolicyConfig(recipe="huge"), "recipe"),
    (lambda: PolicyConfig(n_action_steps=16), "n_action_steps"),
    (lambda: PolicyConfig(state_dim=0), "state_dim"),
    (lambda: PolicyConfig(method="dp", inference_mode="guided"), "inference_mode"),
    (lambda: PolicyConfig(posterior="gru"), "posterior"),
    (lambda: UNetConfig(kernel_size=4), "unet.kernel_size"),
    (lambda: UNetConfig(down_dims=(32, 60)), "unet.down_dims"),
    (lambda: SchedulerConfig(num_inference_steps=0), "scheduler.num_inference_steps"),
    (lambda: SchedulerConfig(sampler="euler"), "scheduler.sampler"),
    (lambda: LatentUpdateConfig(dt=0.0), "latent.dt"),
    (lambda: LossConfig(tau=0.0), "loss.tau"),
    (lambda: ImageEncoderConfig(crop_shape=(100, 84)), "image.crop_shape"),
])
def test_invalid_config_names_the_field(make, field):
    with pytest.raises(ConfigError, match=rf"^{field}:"):
        make()


def test_dict_round_trip_and_unknown_keys():
    cfg = PolicyConfig(recipe="tiny", image=ImageEncoderConfig(cameras=("a", "b")),
                       latent=LatentUpdateConfig(steps=3, eta=0.5))
    d = cfg.to_dict()
    assert PolicyConfig.from_dict(d) == cfg
    with pytest.raises(ConfigError, match="^horizn: unknown"):
        PolicyConfig.from_dict({**d, "horizn": 16})
    with pytest.raises(ConfigError, match="^latent.stepz: unknown"):
        PolicyConfig.from_dict({**d, "latent": {"stepz": 2}})


@pytest.mark.parametrize("d, match", [
    ({"horizon": 16.5}, "^horizon: expected an integer, got 16.5"),
    ({"horizon": True}, "^horizon: expected an integer, got True"),
    ({"method": 1}, "^method: expected a string, got 1"),
    ({"latent": {"dt": float("inf")}}, "^latent.dt: must be a finite number, got inf"),
    ({"loss": {"tau": float("nan")}}, "^loss.tau: must be a finite number, got nan"),
    ({"scheduler": {"clip_sample": 1}}, "^scheduler.clip_sample: expected true or false, got 1"),
])
def test_from_dict_checks_scalar_types(d, match):
    """Checkpoint configs and config files go through the same checks: wrong types name the field."""
    with pytest.raises(ConfigError, match=match):
        PolicyConfig.from_dict(d)
