"""`python train.py --config RECIPE[:variant] --workdir DIR`: the `dalle-jax-train` command from a checkout."""
from dalle_jax.train import cli

if __name__ == "__main__":
    cli()
