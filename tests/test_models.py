"""Every registered model x wiring: shapes, finiteness, gradients; torchvision parity."""

import pytest
import torch
from conftest import small_size

import dynwire
from dynwire.analysis.profile import count_params
from dynwire.models import load_torchvision_state_dict, torchvision_reference

MODELS = dynwire.list_models()
# models with a torchvision counterpart: not the small-input variants, not RandWire (torchvision has none)
TV_MODELS = [n for n in MODELS if not n.startswith("cifar") and dynwire.get_model_cfg(n).family != "randwire"]


@pytest.mark.parametrize("wiring", dynwire.WIRINGS)
@pytest.mark.parametrize("name", MODELS)
def test_forward_backward(name, wiring):
    model = dynwire.create_model(name, num_classes=7, wiring=wiring)
    c, h, w = small_size(name)
    x = torch.randn(2, c, h, w)
    out = model(x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"
    graph_params = [p for n, p in model.named_parameters() if ".edges." in n]
    if wiring == "sequential":
        assert not graph_params
    else:
        assert graph_params and all(torch.isfinite(p.grad).all() for p in graph_params)
    if wiring in ("dynamic", "static"):
        # thresholds and routers really learn: their gradient is not identically zero
        assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith("edges.tau"))
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


@pytest.mark.parametrize("name", TV_MODELS)
def test_sequential_matches_torchvision(name):
    tv = torchvision_reference(name, num_classes=10).eval()
    ours = dynwire.create_model(name, num_classes=10, wiring="sequential").eval()
    assert count_params(ours) == count_params(tv)
    load_torchvision_state_dict(ours, tv.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), tv(x), rtol=0, atol=0)
    # and the same backbone weights load into the DG-Net version (wiring keeps its init)
    dyn = dynwire.create_model(name, num_classes=10, wiring="dynamic")
    load_torchvision_state_dict(dyn, tv.state_dict())
    torch.testing.assert_close(dyn.fc.weight, tv.state_dict()[[k for k in tv.state_dict() if k.endswith("weight")][-1]])


def test_published_parameter_counts():
    # torchvision's documented counts for these architectures
    assert count_params(dynwire.create_model("resnet50", wiring="sequential")) == 25_557_032
    assert count_params(dynwire.create_model("regnet_x_600mf", wiring="sequential")) == 6_196_040


def test_wrong_state_dict_is_refused():
    tv = torchvision_reference("resnet18")
    with pytest.raises(ValueError, match="does not match"):
        load_torchvision_state_dict(dynwire.create_model("resnet50"), tv.state_dict())


def test_model_interface():
    m = dynwire.create_model("resnet18", num_classes=5)
    x = torch.randn(1, 3, 64, 64)
    feats = m.forward_features(x)
    assert feats.shape == (1, 512, 2, 2)
    assert m.forward_head(feats, pre_logits=True).shape == (1, 512)
    inter = m.forward_intermediates(x)
    assert [f.shape[1] for f in inter] == [i["num_chs"] for i in m.feature_info]
    assert [64 // f.shape[-1] for f in inter] == [i["reduction"] for i in m.feature_info]
    m.reset_classifier(3)
    assert m(x).shape == (1, 3)
    m.reset_classifier(0)
    assert m(x).shape == (1, 512)


def test_in_chans_and_small_inputs():
    m = dynwire.create_model("cifar_resnet20", num_classes=10, in_chans=1)
    assert m(torch.randn(3, 1, 28, 28)).shape == (3, 10)


def test_registry_refuses_duplicates():
    from dynwire import register_model

    with pytest.raises(ValueError, match="already registered"):

        @register_model(family="resnet")
        def resnet50(**kwargs):  # noqa: F811
            pass


def test_list_models_patterns():
    assert dynwire.list_models("resnet*") == ["resnet101", "resnet18", "resnet50"]
    assert "cifar_resnet20" in dynwire.list_models("cifar_*")
    assert dynwire.list_models("regnet*", exclude="*y*") == ["regnet_x_1_6gf", "regnet_x_600mf"]


def _randomize_bn(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data = torch.rand(m.weight.shape, generator=g) + 0.5
            m.bias.data = torch.randn(m.bias.shape, generator=g)
            m.running_mean = torch.randn(m.running_mean.shape, generator=g)
            m.running_var = torch.rand(m.running_var.shape, generator=g) + 0.5


@pytest.mark.parametrize("name", ["resnet18", "resnext50_32x4d", "mobilenet_v2", "regnet_y_600mf"])
def test_sequential_matches_torchvision_with_trained_batchnorm(name):
    """Non-default BN weights and running statistics, so a key-mapping mix-up cannot hide."""
    tv = torchvision_reference(name, num_classes=10)
    _randomize_bn(tv)
    ours = dynwire.create_model(name, num_classes=10, wiring="sequential")
    load_torchvision_state_dict(ours, tv.state_dict())
    x = torch.randn(2, 3, 64, 64)
    for mode in ("eval", "train"):
        getattr(tv, mode)()
        getattr(ours, mode)()
        if mode == "train":  # dropout is random: compare features, then BN running stats after the step
            torch.testing.assert_close(ours.forward_features(x), _tv_features(tv, x), rtol=0, atol=0)
            sd_tv = {ours.torchvision_key(k): v for k, v in tv.state_dict().items()}
            for k, v in ours.state_dict().items():
                torch.testing.assert_close(v, sd_tv[k], rtol=0, atol=0, msg=lambda m, k=k: f"{k}: {m}")
        else:
            with torch.no_grad():
                torch.testing.assert_close(ours(x), tv(x), rtol=0, atol=0)


def _tv_features(tv: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if hasattr(tv, "features"):  # mobilenet_v2
        return tv.features(x)
    if hasattr(tv, "trunk_output"):  # regnet
        return tv.trunk_output(tv.stem(x))
    x = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
    return tv.layer4(tv.layer3(tv.layer2(tv.layer1(x))))


@pytest.mark.parametrize("name", MODELS)
def test_router_init_survives_family_init(name):
    """App. 6.4: every router starts with bias +3 and weights N(0, 0.01) in every family."""
    m = dynwire.create_model(name, wiring="dynamic", router_bias=3.0)
    weights = []
    for _, stage in m.graph_stages():
        for r in stage.edges.routers:
            assert torch.all(r.fc.bias == 3.0)
            weights.append(r.fc.weight.flatten())
    w = torch.cat(weights)
    assert abs(w.std().item() - 0.01) < 0.001 and abs(w.mean().item()) < 0.001


@pytest.mark.parametrize("name", ["cifar_resnet20", "mobilenet_v2", "regnet_x_600mf"])
def test_same_seed_same_block_weights_in_every_wiring(name):
    """Paired comparisons between wirings start from the same backbone weights."""
    states = []
    for wiring in dynwire.WIRINGS:
        torch.manual_seed(7)
        m = dynwire.create_model(name, num_classes=10, wiring=wiring)
        states.append({k: v for k, v in m.state_dict().items() if ".edges." not in k})
    for s in states[1:]:
        assert s.keys() == states[0].keys()
        for k in s:
            assert torch.equal(s[k], states[0][k]), k


def test_mobilenet_v2_honours_act_layer():
    m = dynwire.create_model("mobilenet_v2", act_layer=torch.nn.SiLU)
    acts = {type(mod) for mod in m.modules() if isinstance(mod, (torch.nn.ReLU6, torch.nn.SiLU))}
    assert acts == {torch.nn.SiLU}
    assert any(isinstance(mod, torch.nn.SiLU) for mod in m.stage2.modules())
