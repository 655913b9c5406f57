import pytest
import torch
from torch import nn

from dpag_engine.config import ImageEncoderConfig, PolicyConfig
from dpag_engine.model.encoders import ResNet18Trunk, SpatialSoftmax, crop
from dpag_engine.model.unet import ConditionalUnet1D
from dpag_engine.policy import DPAGPolicy


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_lowdim_recipe_parameter_count():
    """Low-dim recipe, Da = 2, conditioning 2 x 20: Diffusion Policy's ~65.8 M U-Net."""
    policy = DPAGPolicy(PolicyConfig(recipe="lowdim", action_dim=2, state_dim=20))
    assert count(policy.unet) == 65_783_298
    assert count(policy.posterior) == 20 * 20 + 20  # log_var = Linear(Do, Do)
    out = policy.unet(torch.randn(2, 16, 2), torch.tensor([3, 77]), torch.randn(2, 40))
    assert out.shape == (2, 16, 2) and torch.isfinite(out).all()


@pytest.mark.slow
def test_image_recipe_parameter_count():
    cfg = PolicyConfig(recipe="image", action_dim=2, state_dim=2, image=ImageEncoderConfig())
    policy = DPAGPolicy(cfg)
    assert count(policy.unet) == 251_511_938
    assert count(policy.encoder) == 11_197_088  # ResNet-18 trunk + keypoint head + Linear
    assert 255e6 <= count(policy) <= 280e6      # the spec's "about 255-280 M"
    policy.eval()
    obs = {"image": torch.rand(1, 2, 3, 96, 96), "state": torch.randn(1, 2, 2)}
    assert policy.encode(obs).shape == (1, 2, 66)


def test_unet_handles_scalar_and_batched_timesteps():
    torch.manual_seed(0)
    cfg = PolicyConfig(recipe="tiny", action_dim=3, state_dim=4)
    unet = ConditionalUnet1D(3, cfg.global_cond_dim, cfg.unet)
    x, c = torch.randn(3, 16, 3), torch.randn(3, 8)
    torch.testing.assert_close(unet(x, 7, c), unet(x, torch.tensor([7, 7, 7]), c))
    # Each sample is independent (GroupNorm, no BatchNorm): row 1 alone equals row 1 in the batch.
    torch.testing.assert_close(unet(x[1:2], 7, c[1:2]), unet(x, 7, c)[1:2], rtol=1e-5, atol=1e-6)
    # The latent matters: changing global_cond changes the prediction.
    assert (unet(x, 7, c) - unet(x, 7, c + 1)).abs().max() > 1e-3


def test_image_trunk_uses_groupnorm_c_over_16():
    trunk = ResNet18Trunk()
    norms = [m for m in trunk.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in trunk.modules())
    assert all(m.num_groups == m.num_channels // 16 for m in norms)
    assert trunk(torch.rand(2, 3, 84, 84)).shape == (2, 512, 3, 3)


def test_spatial_softmax_finds_the_peak():
    head = SpatialSoftmax(1, 1)
    with torch.no_grad():
        head.heatmaps.weight.fill_(100.0)
        head.heatmaps.bias.zero_()
    x = torch.zeros(1, 1, 5, 9)
    x[0, 0, 4, 2] = 1.0  # bottom row, third column
    kp = head(x)[0]
    torch.testing.assert_close(kp, torch.tensor([-1 + 2 * 2 / 8, 1.0]), atol=1e-4, rtol=0)


def test_crop_centre_and_random():
    images = torch.rand(6, 3, 10, 12)
    centre = crop(images, (6, 8), random=False)
    torch.testing.assert_close(centre, images[:, :, 2:8, 2:10])
    g = torch.Generator().manual_seed(3)
    rand = crop(images, (6, 8), random=True, generator=g)
    assert rand.shape == (6, 3, 6, 8)
    for i in range(6):  # every crop is a real window of its own image
        hits = [(r, c) for r in range(5) for c in range(5)
                if torch.equal(images[i, :, r:r + 6, c:c + 8], rand[i])]
        assert len(hits) == 1
