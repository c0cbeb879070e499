"""`python -m dalle_jax.demo --root runs/demo`: the whole captioned_shapes pipeline and its judged report."""
from absl import app

from dalle_jax.demo.stages import main

app.run(main)
