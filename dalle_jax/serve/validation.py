"""The JSON body of a sampling request, checked field by field: a bad one is a `BadRequest` naming the field."""
from __future__ import annotations

import dataclasses
import json
import math
import numbers

from dalle_jax.inference.sampling import SamplingSettings

SETTINGS = ("temperature", "top_k", "top_p", "cond_scale", "candidates")
FIELDS = ("prompts", "num_images", "seed") + SETTINGS


class BadRequest(ValueError):
    """A request the server refuses; `field` names the part of the body at fault ("body": the body itself)."""

    def __init__(self, field: str, message: str, status: int = 422):
        super().__init__(message)
        self.field, self.message, self.status = field, message, status

    def as_json(self) -> dict:
        return dict(error=dict(field=self.field, message=self.message))


@dataclasses.dataclass(frozen=True)
class Limits:
    max_images: int = 16  # prompts x num_images in one request
    max_prompt_chars: int = 256
    max_candidates: int = 16
    image_vocab_size: int | None = None  # top_k above it keeps every code anyway; refused to catch typos


@dataclasses.dataclass(frozen=True)
class SampleRequest:
    prompts: tuple[str, ...]
    num_images: int
    seed: int
    settings: SamplingSettings


def _integer(field: str, value, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low or (
            high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise BadRequest(field, f"{field}={value!r} must be an integer {bound}.")
    return int(value)


def _number(field: str, value, check, expected: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or not check(value):
        raise BadRequest(field, f"{field}={value!r} must be {expected}.")
    return float(value)


def _prompts(value, limits: Limits) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(p, str) for p in value):
        raise BadRequest("prompts", 'prompts must be a non-empty list of strings ("" samples unconditionally).')
    for i, prompt in enumerate(value):
        if len(prompt) > limits.max_prompt_chars:
            raise BadRequest("prompts", f"prompts[{i}] has {len(prompt)} characters; the limit is "
                             f"{limits.max_prompt_chars}. Shorten it.")
    return tuple(value)


def parse(body: bytes, defaults: SamplingSettings, limits: Limits) -> SampleRequest:
    """The request in `body`, with the settings it leaves out (or sets to null) taken from `defaults`."""
    if not body.strip():
        raise BadRequest("body", "The body is empty; send a JSON object such as {\"prompts\": [\"a red circle\"]}.",
                         400)
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRequest("body", f"The body is not JSON ({e}); send a JSON object.", 400) from None
    if not isinstance(data, dict):
        raise BadRequest("body", f"The body must be a JSON object, not {type(data).__name__}.", 400)
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise BadRequest(unknown[0], f"Unknown field {unknown[0]!r}; the fields are {', '.join(FIELDS)}.")
    if "prompts" not in data:
        raise BadRequest("prompts", "prompts is missing; give a list of prompts.")
    prompts = _prompts(data["prompts"], limits)
    num_images = _integer("num_images", data.get("num_images", 1), 1)
    if len(prompts) * num_images > limits.max_images:
        raise BadRequest("num_images", f"{len(prompts)} prompts x num_images={num_images} is "
                         f"{len(prompts) * num_images} images; a request may ask for {limits.max_images} at most.")
    seed = _integer("seed", data.get("seed", 0), 0, 2 ** 32 - 1)
    given = {k: data[k] for k in SETTINGS if data.get(k) is not None}
    if "temperature" in given:
        given["temperature"] = _number("temperature", given["temperature"], lambda v: 0 < v <= 100, "in (0, 100]")
    if "top_p" in given:
        given["top_p"] = _number("top_p", given["top_p"], lambda v: 0 < v <= 1, "in (0, 1] (1: off)")
    if "cond_scale" in given:
        given["cond_scale"] = _number("cond_scale", given["cond_scale"], lambda v: 0 <= v <= 100,
                                      "in [0, 100] (1: no guidance)")
    if "candidates" in given:
        given["candidates"] = _integer("candidates", given["candidates"], 1, limits.max_candidates)
    if "top_k" in given:
        # 0 turns the filter off, as in a run's config.sampling.
        given["top_k"] = _integer("top_k", given["top_k"], 0, limits.image_vocab_size) or None
    settings = dataclasses.replace(defaults, **given)
    settings.validate()
    return SampleRequest(prompts=prompts, num_images=num_images, seed=seed, settings=settings)
