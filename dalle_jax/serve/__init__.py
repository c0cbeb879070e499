"""A web page and an HTTP API that sample from one loaded run (`dalle-jax-serve`; docs/serving.md)."""
