"""The results page keeps a GPU-measured MQAR grid as measured, and leaves the section out when there is none."""
from gla.bench.results import gpu_mqar_section


def test_gpu_mqar_section(tmp_path):
    assert gpu_mqar_section(str(tmp_path)) is None
    gpu = tmp_path / "mqar-gpu"
    gpu.mkdir()
    (gpu / "README.md").write_text("commands and notes\n")
    (gpu / "mqar.md").write_text("| mixer | d=64 |\n|---|---|\n| gla | 50.0% |\n")
    section = gpu_mqar_section(str(tmp_path))
    assert section.startswith("## MQAR on the GPU") and "commands and notes" in section and "| gla | 50.0% |" in section
    assert "results/mqar-gpu/mqar.png" in section
