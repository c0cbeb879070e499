"""Extension (`config.extensions`) of the captioner trainer: each two-object captioned_shapes scene's canonical
caption and its twins (`caption_probe.TWINS`: relation reversed, colours or shapes exchanged), whose ranking the
evaluation reports as `twin_accuracy`. Hook (`dalle_jax/extensions.py`): `contrast_captions`."""
from __future__ import annotations

from typing import Mapping

from dalle_jax.data import shapes_scene
from dalle_jax.shapes import caption_probe


def contrast_captions(record: Mapping) -> list[str | None]:
    """The canonical caption and its twins for a record of a two-object scene; nothing for other records."""
    if record.get("scene") is None:
        return []
    scene = shapes_scene.scene_from_example(record["scene"])
    if len(scene["objects"]) != 2:
        return []
    return [shapes_scene.canonical_caption(scene)] + [caption_probe.twin_caption(scene, t)
                                                      for t in caption_probe.TWINS]
