import pytest

from gptdist.config import (
    Config,
    ConfigError,
    flatten,
    gradient_accumulation_steps,
    load_config,
)


def test_default_yaml_equals_dataclass_defaults():
    assert load_config() == Config()


def test_overrides_apply():
    cfg = load_config(overrides=["train.max_steps=7", "model.preset=nano", "ray.cpus_per_worker=2",
                                 "tune.n_layer=[1, 3]", "train.run_name=abc"])
    assert cfg.train.max_steps == 7
    assert cfg.model.to_gpt_config().n_embd == 64
    assert cfg.ray.cpus_per_worker == 2.0
    assert cfg.tune.n_layer == [1, 3]
    assert cfg.train.run_name == "abc"


def test_config_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  preset: micro\n  n_layer: 3\n")
    cfg = load_config(f)
    assert cfg.model.to_gpt_config().n_layer == 3
    assert cfg.train.max_steps == Config().train.max_steps


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key train\.max_step\b"):
        load_config(overrides=["train.max_step=3"])
    f = tmp_path / "c.yaml"
    f.write_text("trian:\n  max_steps: 3\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown section 'trian'"):
        load_config(f)


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"train\.max_steps='ten' must be an integer"):
        load_config(overrides=["train.max_steps=ten"])
    with pytest.raises(ConfigError, match=r"train\.precision='fp8' is not one of"):
        load_config(overrides=["train.precision=fp8"])


def test_invalid_model_is_named():
    with pytest.raises(ConfigError, match=r"n_embd=100 is not divisible by model\.n_head=6"):
        load_config(overrides=["model.n_embd=100"])
    with pytest.raises(ConfigError, match=r"model\.block_size must be a positive integer, got 0"):
        load_config(overrides=["model.block_size=0"])
    with pytest.raises(ConfigError, match=r"model\.vocab_size=100 is smaller"):
        load_config(overrides=["model.vocab_size=100"])


def test_indivisible_batch_names_values():
    assert gradient_accumulation_steps(16, 4, 2) == 2
    with pytest.raises(ConfigError, match=r"global_batch_size=10 .*micro_batch_size=4 x ray\.num_workers=2"):
        load_config(overrides=["train.global_batch_size=10", "train.micro_batch_size=4", "ray.num_workers=2"])
    # micro_batch_size auto (the default) needs only the global batch to split over the workers
    assert load_config(overrides=["ray.num_workers=2"]).train.micro_batch_size == "auto"
    with pytest.raises(ConfigError, match=r"global_batch_size=8 is not divisible by ray\.num_workers=3"):
        load_config(overrides=["ray.num_workers=3"])
    with pytest.raises(ConfigError, match=r"train\.micro_batch_size='big' is not one of \['auto'\]"):
        load_config(overrides=["train.micro_batch_size=big"])


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}}) == {"a.b": 1, "a.c.d": 2}


def test_controller_poll_interval_must_be_positive():
    with pytest.raises(ConfigError, match=r"ray\.controller_poll_s=0\.0 must be > 0"):
        load_config(overrides=["ray.controller_poll_s=0"])
