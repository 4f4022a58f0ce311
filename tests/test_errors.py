"""Bad input gets a ValueError that names the problem."""

import pytest
import torch

import dynwire


@pytest.fixture(scope="module")
def model():
    return dynwire.create_model("cifar_resnet20", num_classes=10)


def test_wrong_channels(model):
    with pytest.raises(ValueError, match="expected 3 input channels, got 1.*in_chans=1"):
        model(torch.randn(2, 1, 32, 32))


def test_wrong_rank(model):
    with pytest.raises(ValueError, match="4-D input.*unsqueeze"):
        model(torch.randn(3, 32, 32))


def test_non_float(model):
    with pytest.raises(ValueError, match="floating-point.*uint8"):
        model(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))


def test_unknown_model_suggests():
    with pytest.raises(ValueError, match="unknown model 'resnet5'.*resnet50"):
        dynwire.create_model("resnet5")


def test_unknown_wiring_suggests():
    with pytest.raises(ValueError, match="unknown wiring 'dynamc'.*dynamic"):
        dynwire.create_model("resnet18", wiring="dynamc")


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(wiring="random-er", er_p=0.0), "er_p"),
        (dict(wiring="random-ba", ba_m=0), "ba_m"),
        (dict(wiring="random-ws", ws_k=3), "ws_k"),
        (dict(wiring="random-ws", ws_p=1.5), "ws_p"),
        (dict(eval_gate="sometimes"), "eval_gate"),
        (dict(router_bias=float("nan")), "router_bias"),
        (dict(graph_seed=-1), "graph_seed"),
        (dict(num_classes=-1), "num_classes"),
        (dict(drop_rate=1.5), "drop_rate"),
        (dict(in_chans=0), "in_chans"),
        (dict(not_an_option=1), "not_an_option"),
    ],
)
def test_invalid_hyper_parameters(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        dynwire.create_model("cifar_resnet20", **kwargs)


def test_aggregate_shape_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        dynwire.aggregate(torch.ones(2, 2), [torch.randn(2, 4, 8, 8), torch.randn(2, 4, 4, 4)])
    with pytest.raises(ValueError, match=r"shape \(batch, 2\)"):
        dynwire.aggregate(torch.ones(2, 3), [torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)])


def test_set_eval_gate_validates(model):
    with pytest.raises(ValueError, match="eval_gate"):
        model.set_eval_gate("maybe")
