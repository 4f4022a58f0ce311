"""Every registered model x wiring: shapes, finiteness, gradients; torchvision parity."""

import pytest
import torch
from conftest import small_size

import dynwire
from dynwire.analysis.profile import count_params
from dynwire.models import load_torchvision_state_dict, torchvision_reference

MODELS = dynwire.list_models()
TV_MODELS = [n for n in MODELS if dynwire.get_model_cfg(n).family != "resnet" or not n.startswith("cifar")]


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
    graph_params = [p for n, p in model.named_parameters() if ".graph." in n]
    if wiring == "sequential":
        assert not graph_params
    else:
        assert graph_params and all(torch.isfinite(p.grad).all() for p in graph_params)
    if wiring in ("dynamic", "static"):
        # thresholds and routers really learn: their gradient is not identically zero
        assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith("graph.tau"))
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


@pytest.mark.parametrize("name", [n for n in MODELS if not n.startswith("cifar")])
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
