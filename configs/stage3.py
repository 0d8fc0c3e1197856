"""Stage 3 of the AF2 curriculum (see configs/base.py and docs/TRAINING.md): `--config configs/stage3.py:PRESET`
with PRESET in tiny | 0.5b | 1.5b | 3b."""
import importlib.util
import pathlib

# config_flags loads this file by path, so its sibling is loaded the same way
_spec = importlib.util.spec_from_file_location("af2_configs_base", pathlib.Path(__file__).with_name("base.py"))
base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(base)


def get_config(preset: str = "tiny"):
    return base.stage_config(3, preset)
