"""Export to a standalone runtime: ``gla export`` writes an ONNX directory, ``load_exported`` runs one."""
from .runner import ExportedModel, export_meta


def load_exported(path: str, threads: int | None = None) -> ExportedModel:
    """An export directory (from ``gla export``) loaded into ONNX Runtime: ``.generate(prompt_ids, ...)``,
    ``.forward(ids, state)``, ``.codec.encode / decode``."""
    return ExportedModel(path, threads)


def export(ckpt: str, out: str, quantize: str | None = None, max_block: int = 64) -> dict:
    """See ``gla.export.to_onnx.export`` (imported on use: it needs torch.onnx and onnxscript)."""
    from .to_onnx import export as run
    return run(ckpt, out, quantize, max_block)


__all__ = ["ExportedModel", "export_meta", "load_exported", "export"]
