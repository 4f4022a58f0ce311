"""Run-config schema: YAML loading, --set overrides, validation messages, shipped recipes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from dynwire.engine.config import (
    RunConfig,
    apply_overrides,
    config_to_dict,
    load_config,
    resolve_config_path,
    save_config,
    shipped_configs,
)


def test_defaults_and_overrides_are_typed() -> None:
    cfg = load_config(
        None,
        [
            "optim.lr=0.2",
            "optim.weight_decay=4e-5",  # YAML reads this as a string; float fields accept it
            "schedule.epochs=7",
            "train.ema_decay=0.999",
            "optim.clip_grad_norm=null",
            "model.wiring=static",
            "model.wiring_kwargs.tau_init=0.5",
            "data.subset=100",
            "output.name=my_run",
        ],
    )
    assert cfg.optim.lr == 0.2 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.weight_decay == pytest.approx(4e-5)
    assert cfg.schedule.epochs == 7 and isinstance(cfg.schedule.epochs, int)
    assert cfg.train.ema_decay == 0.999
    assert cfg.optim.clip_grad_norm is None
    assert cfg.model.wiring == "static"
    assert cfg.model.wiring_kwargs == {"tau_init": 0.5}
    assert cfg.data.subset == 100
    assert cfg.run_dir == Path("runs") / "my_run"


def test_lr_scales_linearly_with_global_batch() -> None:
    cfg = load_config(None, ["optim.lr=0.4", "optim.reference_batch=1024", "data.batch_size=256"])
    assert cfg.scaled_lr() == pytest.approx(0.1)


def test_override_wins_over_file_and_later_override_wins(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lr: 0.3\nschedule:\n  epochs: 4\n")
    cfg = load_config(p, ["optim.lr=0.5", "optim.lr=0.6"])
    assert cfg.optim.lr == 0.6
    assert cfg.schedule.epochs == 4


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("optim.lr=-1", r"^optim\.lr=-1: must be > 0$"),
        ("optim.lr=abc", r"^optim\.lr='abc': expected a number$"),
        ("schedule.epochs=ten", r"^schedule\.epochs='ten': expected an int$"),
        ("schedule.epochs=2.5", r"^schedule\.epochs=2\.5: expected an int$"),
        ("schedule.epochs=0", r"^schedule\.epochs=0: must be > 0$"),
        ("data.batch_size=true", r"^data\.batch_size=True: expected an int$"),
        ("data.num_workers=-2", r"^data\.num_workers=-2: must be >= 0$"),
        ("optim.momentum=1.5", r"^optim\.momentum=1\.5: must be in \[0, 1\)$"),
        ("optim.label_smoothing=1", r"^optim\.label_smoothing=1: must be in \[0, 1\)$"),
        ("train.ema_decay=1.0", r"^train\.ema_decay=1\.0: must be in \(0, 1\)$"),
        ("optim.clip_grad_norm=0", r"^optim\.clip_grad_norm=0: must be > 0$"),
        ("train.amp=fp16", r"^train\.amp='fp16': must be one of none, bf16 \(did you mean 'bf16'\?\)$"),
        (
            "train.compile_mode=reduce_overhead",
            r"^train\.compile_mode='reduce_overhead': must be one of default, reduce-overhead, max-autotune "
            r"\(did you mean 'reduce-overhead'\?\)$",
        ),
        (
            "model.wiring=dynamc",
            r"^model\.wiring='dynamc': must be one of sequential, dynamic, .*did you mean 'dynamic'",
        ),
        ("data.name=mnist", r"^data\.name='mnist': must be one of fashion_mnist, cifar10, cifar100, imagenet"),
        ("train.channels_last=maybe", r"^train\.channels_last='maybe': expected a bool"),
        ("model.wiring_kwargs=3", r"^model\.wiring_kwargs=3: expected a mapping$"),
        (
            "model.wirng=dynamic",
            r"^model\.wirng: unknown key \(did you mean 'wiring'\?\); allowed: name, wiring, wiring_kwargs, drop_rate$",
        ),
        ("optimizer.lr=0.1", r"^optimizer: unknown key \(did you mean 'optim'\?\); allowed: model, data, optim"),
        ("optim.lr", r"^override 'optim\.lr': expected key\.sub=value"),
        ("lr=0.1", r"^override 'lr=0\.1': key 'lr' must look like section\.key"),
        ("optim.lr.x=1", r"optim\.lr is not a mapping"),
        ("schedule.warmup_epochs=50", r"^schedule\.warmup_epochs=50\.0: must be <= schedule\.epochs \(10\)$"),
        ("output.name=a/b", r"^output\.name='a/b': must be a plain folder name"),
        ("train.resume=", r"^train\.resume='': must be a non-empty string$"),
    ],
)
def test_validation_errors_name_key_value_and_rule(override: str, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        load_config(None, [override])


def test_unknown_key_in_yaml_file(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("schedule:\n  epoch: 3\n")
    with pytest.raises(ValueError, match=r"^schedule\.epoch: unknown key \(did you mean 'epochs'\?\); allowed: epochs"):
        load_config(p)
    p.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="top level must be a mapping"):
        load_config(p)
    p.write_text("optim: [1, 2]\n")
    with pytest.raises(ValueError, match=r"^optim=\[1, 2\]: expected a mapping"):
        load_config(p)


def test_missing_config_suggests_shipped_name() -> None:
    with pytest.raises(ValueError, match=r"fmnist_resnet2'.*did you mean 'fmnist_resnet20'"):
        resolve_config_path("fmnist_resnet2")


def test_resolved_config_round_trips_through_yaml(tmp_path: Path) -> None:
    cfg = load_config("fmnist_resnet20", ["optim.lr=0.05", "model.wiring_kwargs.tau_init=0.1"])
    out = tmp_path / "config.yaml"
    save_config(cfg, out)
    again = load_config(out)
    assert again == cfg
    assert yaml.safe_load(out.read_text())["optim"]["lr"] == 0.05
    assert not list(tmp_path.glob(".*tmp"))  # no temp file left behind


def test_apply_overrides_does_not_mutate_input() -> None:
    raw = {"optim": {"lr": 0.1}}
    out = apply_overrides(raw, ["optim.lr=0.2"])
    assert raw == {"optim": {"lr": 0.1}} and out == {"optim": {"lr": 0.2}}


EXPECTED_SHIPPED = {
    "imagenet_mobilenet_v2",
    "imagenet_resnet18",
    "imagenet_resnet50",
    "imagenet_resnet101",
    "imagenet_resnext50_32x4d",
    "imagenet_regnet_x_600mf",
    "imagenet_regnet_x_1_6gf",
    "imagenet_regnet_y_600mf",
    "fmnist_resnet20",
    "cifar10_resnet20",
    "cifar10_resnet56",
}


def test_all_recipes_are_shipped_and_valid() -> None:
    names = set(shipped_configs())
    assert EXPECTED_SHIPPED <= names
    for name in names:
        cfg = load_config(name)
        assert isinstance(cfg, RunConfig)
        assert cfg.optim.momentum == 0.9 and not cfg.optim.nesterov
        assert cfg.optim.no_decay_norm_bias


# (epochs, lr @ batch 1024, weight decay, dropout) from App. 6.1 of the paper.
PAPER = {
    "mobilenet_v2": (200, 0.4, 4e-5, 0.2),
    "resnet18": (100, 0.4, 1e-4, 0.0),
    "resnet50": (100, 0.4, 1e-4, 0.0),
    "resnet101": (100, 0.4, 1e-4, 0.0),
    "resnext50_32x4d": (100, 0.4, 1e-4, 0.0),
    "regnet_x_600mf": (100, 0.8, 5e-5, 0.0),
    "regnet_x_1_6gf": (100, 0.8, 5e-5, 0.0),
    "regnet_y_600mf": (100, 0.8, 5e-5, 0.0),
}


@pytest.mark.parametrize("model", sorted(PAPER))
def test_imagenet_recipes_match_the_paper(model: str) -> None:
    epochs, lr, wd, drop = PAPER[model]
    cfg = load_config(f"imagenet_{model}")
    assert cfg.model.name == model and cfg.model.wiring == "dynamic"
    assert cfg.data.name == "imagenet" and cfg.data.batch_size == 1024
    assert cfg.optim.reference_batch == 1024 and cfg.scaled_lr() == pytest.approx(lr)
    assert cfg.optim.weight_decay == pytest.approx(wd)
    assert cfg.optim.label_smoothing == pytest.approx(0.1)
    assert cfg.model.drop_rate == pytest.approx(drop)
    assert cfg.schedule.epochs == epochs and cfg.schedule.warmup_epochs == 5 and cfg.schedule.cosine


def test_config_dict_has_only_plain_values() -> None:
    def walk(x: object) -> None:
        if isinstance(x, dict):
            for k, v in x.items():
                assert isinstance(k, str)
                walk(v)
        else:
            assert x is None or isinstance(x, (str, int, float, bool)), repr(x)

    walk(config_to_dict(load_config("imagenet_resnet50")))
    assert re.match(r"^[a-z]", load_config("fmnist_resnet20").run_name)


# --------------------------------------------------------------------------- run names, aliases, wiring options
def test_run_name_is_derived_from_the_config() -> None:
    """#8: the README's `--set model.wiring=sequential` must not train into the dynamic run's folder."""
    seq = load_config("fmnist_resnet20", ["model.wiring=sequential"])
    assert seq.run_dir == Path("runs") / "fashion_mnist_cifar_resnet20_sequential"
    assert load_config("fmnist_resnet20").run_name == "fashion_mnist_cifar_resnet20_dynamic"
    assert load_config("fmnist_resnet20", ["output.name=mine"]).run_name == "mine"
    for name in shipped_configs():
        cfg = load_config(name)
        assert cfg.output.name is None, name
        assert cfg.run_name == f"{cfg.data.name}_{cfg.model.name}_{cfg.model.wiring}"


@pytest.mark.parametrize("alias", ["fmnist", "fashion-mnist", "fashion_mnist", "FashionMNIST", "Fashion-MNIST"])
def test_dataset_aliases_are_accepted_and_stored_canonical(alias: str) -> None:
    cfg = load_config(None, [f"data.name={alias}"])
    assert cfg.data.name == "fashion_mnist"
    assert config_to_dict(cfg)["data"]["name"] == "fashion_mnist"


@pytest.mark.parametrize(
    "override, pattern",
    [
        (
            "model.wiring_kwargs.tau_int=0.5",
            r"^model\.wiring_kwargs\.tau_int: unknown wiring option \(did you mean 'tau_init'\?\); allowed: .*router_bias",
        ),
        ("model.wiring_kwargs.eval_gate=sometimes", r"^model\.wiring_kwargs=\{'eval_gate': 'sometimes'\}: .*eval_gate"),
        ("model.wiring_kwargs.er_p=0.0", r"^model\.wiring_kwargs=\{'er_p': 0\.0\}: .*er_p"),
    ],
)
def test_wiring_kwargs_are_validated_when_the_config_loads(override: str, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        load_config("fmnist_resnet20", [override, "model.wiring=random-er"])


def test_recipes_hold_only_what_differs() -> None:
    """Each shipped recipe names a base and the dozen keys that define it; the saved config is complete."""
    from importlib import resources

    root = resources.files("dynwire") / "configs"
    for name in shipped_configs():
        raw = yaml.safe_load((root / f"{name}.yaml").read_text())
        leaves = [(s, k) for s, sec in raw.items() if isinstance(sec, dict) for k in sec]
        assert len(leaves) <= 12, (name, leaves)
        assert "output" not in raw, name
    full = config_to_dict(load_config("imagenet_resnet50"))
    assert set(full) == {"model", "data", "optim", "schedule", "train", "output"}
    assert full["train"]["amp"] == "bf16" and full["data"]["num_workers"] == 8 and full["output"]["dir"] == "runs"


def test_base_recipe_is_merged_first_and_cycles_are_refused(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text("optim:\n  lr: 0.3\n  momentum: 0.8\nschedule:\n  epochs: 4\n")
    (tmp_path / "child.yaml").write_text("_base_: base.yaml\noptim:\n  lr: 0.5\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.schedule.epochs) == (0.5, 0.8, 4)
    (tmp_path / "base.yaml").write_text("_base_: child.yaml\n")
    with pytest.raises(ValueError, match="_base_ cycle"):
        load_config(tmp_path / "child.yaml")
    (tmp_path / "child.yaml").write_text("_base_: nowhere\n")
    with pytest.raises(ValueError, match=r"_base_.*nowhere"):
        load_config(tmp_path / "child.yaml")
