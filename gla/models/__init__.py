"""Models: configuration, the GLA / hybrid transformer, its state, and checkpoint loading."""
from .config import GLAConfig, PRESETS
from .state import ModelState
from .transformer import GLATransformer, read_config


def from_pretrained(path: str, map_location="cpu") -> GLATransformer:
    """A GLATransformer from our checkpoint directory or from an FLA GLA checkpoint directory (model_type "gla")."""
    if read_config(path).get("model_type") == "gla":
        from .fla import load_fla
        return load_fla(path, map_location)
    return GLATransformer.from_pretrained(path, map_location)


__all__ = ["GLAConfig", "PRESETS", "ModelState", "GLATransformer", "from_pretrained"]
