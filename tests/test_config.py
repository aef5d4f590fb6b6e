from pathlib import Path

import pytest

from ipr_core.config import ConfigError, IPRConfig, apply_overrides, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_validate_and_are_frozen():
    cfg = load_config()
    assert cfg.mc.n_rollouts == 5 and cfg.mc.temperature == 1.0  # paper N=5, T=1.0
    assert cfg.training.ipr.beta == 0.1
    with pytest.raises(Exception):
        cfg.seed = 3  # frozen


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("run_name: x1\nenv:\n  name: babyai\n  train_tasks: 8\n")
    cfg = load_config(p, ["env.train_tasks=16", "pairs.step_variant=single_action", "sampling.history_turns=null"])
    assert cfg.run_name == "x1" and cfg.env.train_tasks == 16
    assert cfg.pairs.step_variant == "single_action" and cfg.sampling.history_turns is None


def test_digest_changes_with_content():
    a, b = load_config(), load_config(overrides=["seed=1"])
    assert a.digest() == load_config().digest() != b.digest()


@pytest.mark.parametrize(
    "override, field, value",
    [
        ("env.bogus=1", "env.bogus", "1"),
        ("mc.n_rollouts=zero", "mc.n_rollouts", '"zero"'),
        ("mc.n_rollouts=0", "mc.n_rollouts", "0"),
        ("pairs.step_variant=half", "pairs.step_variant", '"half"'),
        ("run_name=has space", "run_name", '"has space"'),
    ],
)
def test_bad_values_name_field_and_value(override, field, value):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    msg = str(e.value)
    assert field in msg and value in msg


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("env: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(lst)
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides({}, ["novalue"])


def test_cross_field_check():
    with pytest.raises(ConfigError, match="num_heads"):
        load_config(overrides=["model.tiny.hidden_size=100", "model.tiny.num_heads=3"])


def test_shipped_configs_validate():
    files = sorted((ROOT / "configs").glob("*.yaml"))
    assert files, "configs/*.yaml missing"
    from ipr_core.experiment import expand, load_experiment

    for f in files:
        if f.name.startswith("experiment"):  # an experiment file: each of its runs' configs validates
            assert all(isinstance(r.cfg, IPRConfig) for r in expand(load_experiment(f)))
        else:
            assert isinstance(load_config(f), IPRConfig)
