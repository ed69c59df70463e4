"""The results page keeps a GPU-measured MQAR grid as measured, leaves the section out when there is none, and can
re-splice that section alone without touching the CPU sections."""
import pytest

from gla.bench.results import GPU_HEADING, gpu_mqar_section, main, splice_gpu_section


def _gpu_dir(res, notes="commands and notes\n", table="| mixer | d=64 |\n|---|---|\n| gla | 50.0% |\n"):
    gpu = res / "mqar-gpu"
    gpu.mkdir(parents=True, exist_ok=True)
    (gpu / "README.md").write_text(notes)
    (gpu / "mqar.md").write_text(table)


def test_gpu_mqar_section(tmp_path):
    assert gpu_mqar_section(str(tmp_path)) is None
    _gpu_dir(tmp_path)
    section = gpu_mqar_section(str(tmp_path))
    assert section.startswith("## MQAR on the GPU") and "commands and notes" in section and "| gla | 50.0% |" in section
    assert "results/mqar-gpu/mqar.png" in section


def test_gpu_only_replaces_the_old_section_and_keeps_the_cpu_ones(tmp_path):
    cpu = "# Results\n\n## MQAR recall across token mixers\n\n| gla | 12.3% |\n\n## CPU operator\n\ntimes\n\n"
    _gpu_dir(tmp_path / "results", notes="old notes\n", table="| gla | 1.0% |\n")
    (tmp_path / "results.md").write_text(cpu + gpu_mqar_section(str(tmp_path / "results")))
    _gpu_dir(tmp_path / "results", notes="new notes\n", table="| gla | 99.0% |\n")
    main(["--out", str(tmp_path), "--gpu-only"])
    text = (tmp_path / "results.md").read_text()
    assert text == cpu + gpu_mqar_section(str(tmp_path / "results"))
    assert "new notes" in text and "old notes" not in text and "| gla | 1.0% |" not in text
    assert text.count(GPU_HEADING) == 1


def test_gpu_only_appends_a_missing_section_and_ignores_quotes_of_its_heading(tmp_path):
    cpu = f"# Results\n\nCPU text that quotes \"{GPU_HEADING}\" inline\n"
    (tmp_path / "results.md").write_text(cpu)
    _gpu_dir(tmp_path / "results")
    splice_gpu_section(str(tmp_path))
    assert (tmp_path / "results.md").read_text() == cpu + "\n" + gpu_mqar_section(str(tmp_path / "results"))


def test_gpu_only_needs_the_page_and_the_grid(tmp_path):
    with pytest.raises(SystemExit, match="results.md does not exist"):
        splice_gpu_section(str(tmp_path))
    (tmp_path / "results.md").write_text("# Results\n")
    with pytest.raises(SystemExit, match="mqar.md does not exist"):
        splice_gpu_section(str(tmp_path))
    assert (tmp_path / "results.md").read_text() == "# Results\n"


def test_gpu_only_rejects_quick(tmp_path, capsys):
    (tmp_path / "results.md").write_text("# Results\n")
    _gpu_dir(tmp_path / "results")
    with pytest.raises(SystemExit) as stop:
        main(["--out", str(tmp_path), "--gpu-only", "--quick"])
    assert stop.value.code == 2 and "--quick does not apply" in capsys.readouterr().err
    assert (tmp_path / "results.md").read_text() == "# Results\n"
