"""Helpers shared by the tests."""

from pathlib import Path

from hydra import compose, initialize_config_dir

from mopd_ray.config import finalize, register_configs

CONF = Path(__file__).resolve().parents[1] / "conf"
register_configs()


def compose_cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return finalize(compose(config_name="config", overrides=list(overrides)))
