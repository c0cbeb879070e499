"""`python -m dalle_jax.demo --root runs/demo` (or `dalle-jax-demo`): the whole captioned_shapes pipeline and its
judged report."""
from dalle_jax.demo.stages import cli

cli()
