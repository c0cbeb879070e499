"""`python sample.py --workdir RUN --prompt "..." --out grid.png`: the `dalle-jax-sample` command from a checkout."""
from dalle_jax.inference.sample import cli

if __name__ == "__main__":
    cli()
