"""Model sources (registry) and the built-in models."""

from autocompress.models.sources import BUILTIN_MODELS, MODEL_SOURCES, LoadedModel, load_model

__all__ = ["BUILTIN_MODELS", "MODEL_SOURCES", "LoadedModel", "load_model"]
