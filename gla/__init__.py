"""gla: Gated Linear Attention (Yang et al., ICML 2024) — operator, layers, models, training and evaluation."""
from .generation import generate, stream
from .layers import GatedLinearAttention, GLALayer, SoftmaxAttention
from .models import GLAConfig, GLATransformer, ModelState, from_pretrained
from .ops import gated_linear_attention

__all__ = ["gated_linear_attention", "GatedLinearAttention", "GLALayer", "SoftmaxAttention", "GLAConfig",
           "GLATransformer", "ModelState", "from_pretrained", "generate", "stream"]
__version__ = "0.1.0"


def _register_with_transformers() -> None:
    """Let transformers' Auto classes load our checkpoints (model_type "gla_lm") after ``import gla``.

    Importing transformers takes seconds, so it is not imported here: if it is already loaded the adapter registers
    now, otherwise a one-shot import hook registers it right after transformers is first imported. Nothing happens
    when transformers is not installed.
    """
    import importlib
    import importlib.abc
    import importlib.util
    import sys

    def register():
        try:
            importlib.import_module("gla.models.hf")
        except ImportError as e:  # an incompatible transformers must not break `import transformers` itself
            import warnings
            warnings.warn(f"gla: the Hugging Face adapter is not registered: {e}")

    if sys.modules.get("transformers") is not None:
        register()
        return
    try:
        if importlib.util.find_spec("transformers") is None:
            return
    except (ValueError, ImportError):  # blocked in sys.modules (None) or a broken install
        return

    class AfterImport(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            if fullname != "transformers":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(fullname)
            if spec is not None and spec.loader is not None:
                run = spec.loader.exec_module

                def exec_module(module):
                    run(module)
                    register()

                spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, AfterImport())


_register_with_transformers()
