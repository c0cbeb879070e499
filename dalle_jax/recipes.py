"""Recipes: the configs shipped in `dalle_jax/configs/`, named on the command line as `NAME[:variant]`.

`--config shapes_vqgan:tiny` and `--config path/to/my_recipe.py:tiny` both work: a name without a path separator
or `.py` is a packaged recipe, anything else a file (which may import `dalle_jax.configs.*` to extend one).
"""
import importlib
import os
import pkgutil

import ml_collections
from absl import flags
from ml_collections.config_flags import config_flags  # the module, for its parser and flag classes

from dalle_jax import configs

_SHARED = ("common", "vqgan_common", "seq2seq_common")  # building blocks of recipes, not recipes themselves


def names() -> list[str]:
    """The packaged recipes, sorted."""
    return sorted(m.name for m in pkgutil.iter_modules(configs.__path__) if m.name not in _SHARED)


def resolve(spec: str) -> str:
    """`NAME[:variant]` or `FILE.py[:variant]` -> `FILE.py[:variant]`, with the packaged recipe's file for NAME."""
    head, sep, variant = spec.partition(":")
    if head.endswith(".py") or os.sep in head or "/" in head:
        if not os.path.isfile(head):
            raise ValueError(f"config file {head!r} does not exist; give a path to a recipe file or one of the "
                             f"packaged recipes: {', '.join(names())}.")
        return spec
    if head not in names():
        raise ValueError(f"{head!r} is not a packaged recipe; use one of {', '.join(names())} (optionally with "
                         "':variant', e.g. 'shapes_vqgan:tiny') or a path to a recipe file.")
    return os.path.join(os.path.dirname(configs.__file__), f"{head}.py") + sep + variant


def load(spec: str) -> ml_collections.ConfigDict:
    """The config `spec` names (unlocked), as `--config spec` would give it."""
    path, _, variant = resolve(spec).partition(":")
    if os.path.dirname(os.path.abspath(path)) == os.path.dirname(os.path.abspath(configs.__file__)):
        module = importlib.import_module(f"dalle_jax.configs.{os.path.basename(path)[:-3]}")
        return module.get_config(variant)
    return config_flags.ConfigFileFlagParser("recipe", lock_config=False).parse(resolve(spec))


class _RecipeParser(config_flags.ConfigFileFlagParser):
    def parse(self, spec):
        return super().parse(resolve(spec))


def define_flag(name: str = "config", flag_values: flags.FlagValues = flags.FLAGS) -> flags.FlagHolder:
    """`--config NAME[:variant]` (or a file path) with `--config.field=value` overrides, as ml_collections gives."""
    flag = config_flags._ConfigFlag(  # the class DEFINE_config_file builds, here with our parser
        parser=_RecipeParser(name=name, lock_config=True), serializer=flags.ArgumentSerializer(), name=name,
        default=None, help_string=f"A recipe ({', '.join(names())}), optionally ':variant' (e.g. shapes_vqgan:tiny), "
        "or a path to a recipe file.", flag_values=flag_values)
    return flags.DEFINE_flag(flag, flag_values)
