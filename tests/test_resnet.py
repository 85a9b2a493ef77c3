"""The shared ResNet: torchvision's keys and numbers, and every family's options."""
import pytest
import torch
import torchvision
from torch import nn

from zoo.models.resnet import FrozenBatchNorm2d, ResNet


def test_same_keys_shapes_and_outputs_as_torchvision():
    ours, theirs = ResNet(num_classes=1000).eval(), torchvision.models.resnet50().eval()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 64, 80)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)


def test_last_stride_one_keeps_layer4_resolution():
    out = ResNet(width_div=16, last_stride=1)(torch.randn(1, 3, 256, 128))
    assert out.shape == (1, 128, 16, 8)


def test_inflated_3d_network_keeps_time():
    model = ResNet(conv_dims=3, width_div=16)
    assert model.conv1.weight.shape == (4, 3, 1, 7, 7)
    assert model(torch.randn(2, 3, 4, 64, 64)).shape == (2, 128, 4, 2, 2)


def test_frozen_batchnorm_has_no_trainable_state_and_matches_eval_bn():
    bn = nn.BatchNorm2d(8).eval()
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 2)
    frozen = FrozenBatchNorm2d(8)
    frozen.load_state_dict(bn.state_dict())  # num_batches_tracked is ignored
    x = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(frozen(x), bn(x))
    assert list(frozen.parameters()) == []
    model = ResNet(width_div=16, norm_layer=FrozenBatchNorm2d)
    assert not any("num_batches_tracked" in k for k in model.state_dict())


def test_spatial_layer_replaces_conv2_and_stem_replaces_conv1():
    calls = []

    def spatial(stage, block, width, stride):
        calls.append((stage, block, width, stride))
        return nn.Sequential(nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.AvgPool2d(stride) if stride > 1 else nn.Identity())

    stem = nn.Sequential(nn.Conv2d(3, 4, 4, 4, bias=False), nn.ReLU())
    model = ResNet(layers=(1, 1, 1, 1), width_div=16, spatial_layer=spatial, stem=stem)
    assert calls == [(1, 0, 4, 1), (2, 0, 8, 2), (3, 0, 16, 2), (4, 0, 32, 2)]
    assert "conv2.0.weight" in dict(model.layer2[0].named_parameters())
    assert not hasattr(model, "conv1")
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 128, 2, 2)


def test_after_stage_hook_sees_every_stage():
    class Hooked(ResNet):
        def after_stage(self, stage, x):
            self.seen.append((stage, x.shape[1]))
            return x

    model = Hooked(width_div=16)
    model.seen = []
    model(torch.randn(1, 3, 64, 64))
    assert model.seen == [(1, 16), (2, 32), (3, 64), (4, 128)]


def test_stochastic_depth_is_identity_in_eval_and_random_in_training():
    torch.manual_seed(0)
    model = ResNet(layers=(1, 1, 1, 1), width_div=16, stochastic_depth=0.5, num_classes=3)
    assert [b.survival for layer in model.stages for b in layer] == pytest.approx([1.0, 5 / 6, 2 / 3, 0.5])
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    torch.testing.assert_close(model(x), model(x))


def test_bad_arguments_and_inputs_are_named():
    with pytest.raises(ValueError, match="four positive block counts"):
        ResNet(layers=(3, 4, 6))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        ResNet(width_div=16)(torch.randn(3, 64, 64))


@pytest.mark.parametrize("trainable, first_trained", [(0, None), (3, "layer2"), (5, "conv1")])
def test_freeze_stages_trains_the_last_n_parts(trainable, first_trained):
    """torchvision's trainable_backbone_layers: conv1 (+ bn1), layer1..4 frozen from the front."""
    from zoo.models.resnet import STAGE_NAMES, freeze_stages

    model = ResNet(layers=(1, 1, 1, 1), width_div=16)
    freeze_stages(model, trainable)
    trained = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    expected = set(STAGE_NAMES[STAGE_NAMES.index(first_trained):]) if first_trained else set()
    if "conv1" in expected:
        expected.add("bn1")
    assert trained == expected
    with pytest.raises(ValueError, match="trainable_backbone_layers"):
        freeze_stages(model, 6)
