from dalle_jax.serve.cli import cli

cli()
