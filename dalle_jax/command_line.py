"""Starts an absl command so that `--help` shows the command's own description and flags, whether it runs as an
installed console script (whose `__main__` is a generated wrapper), `python train.py` or `python -m ...`."""
import sys

from absl import app, flags


def run(main, *flag_modules: str) -> None:
    """`app.run(main)`, with the docstring of `flag_modules[0]` and the flags of every one of `flag_modules` shown,
    refusing positional arguments (every command takes flags only)."""
    sys.modules["__main__"].__doc__ = sys.modules[flag_modules[0]].__doc__
    for module in flag_modules:
        for flag in flags.FLAGS.get_flags_for_module(module):
            flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)

    def flags_only(argv):
        if len(argv) > 1:
            raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
        return main(argv)

    app.run(flags_only)
