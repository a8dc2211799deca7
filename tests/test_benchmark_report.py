"""benchmarks/report.py: a script's BENCHMARKS.md section is replaced in place between its markers, every other byte
of the file (the hand-written title and "## Status", the other scripts' sections) stays as it was."""
from pathlib import Path

import pytest

from benchmarks.report import markers, merge_from, read_section, section_ids, write_section

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = "benchmarks/pipeline.py"
OFFLOAD = "benchmarks/offload.py"


@pytest.fixture
def bench(tmp_path) -> Path:
    """This checkout's BENCHMARKS.md without the scripts' sections: its hand-written title and Status section."""
    path = tmp_path / "BENCHMARKS.md"
    text = (ROOT / "BENCHMARKS.md").read_text()
    path.write_text(text.split("\n<!-- benchmarks/")[0].rstrip("\n") + "\n")
    return path


def test_first_write_appends_and_keeps_the_hand_written_text(bench):
    original = bench.read_text()
    write_section(bench, PIPELINE, "## Pipeline\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n")
    text = bench.read_text()
    start, end = markers(PIPELINE)
    assert text == original.rstrip("\n") + f"\n\n{start}\n## Pipeline\n\n| a | b |\n|---|---|\n| 1 | 2 |\n{end}\n"
    assert read_section(bench, PIPELINE) == "## Pipeline\n\n| a | b |\n|---|---|\n| 1 | 2 |"


def test_rewrite_replaces_only_its_own_section(bench):
    original = bench.read_text()
    write_section(bench, PIPELINE, "## Pipeline\n\nold pipeline numbers")
    write_section(bench, OFFLOAD, "## Offload\n\noffload numbers\n\n## not a section boundary\n\nstill offload")
    write_section(bench, PIPELINE, "## Pipeline\n\nnew pipeline numbers\nsecond line")
    text = bench.read_text()
    assert text.startswith(original.rstrip("\n") + "\n\n")
    assert text.count(markers(PIPELINE)[0]) == 1 and text.count(markers(PIPELINE)[1]) == 1
    assert "old pipeline numbers" not in text
    assert read_section(bench, PIPELINE) == "## Pipeline\n\nnew pipeline numbers\nsecond line"
    assert read_section(bench, OFFLOAD) == "## Offload\n\noffload numbers\n\n## not a section boundary\n\nstill offload"
    assert text.index(markers(PIPELINE)[0]) < text.index(markers(OFFLOAD)[0])  # stays where it was


def test_text_after_a_section_is_kept(tmp_path):
    path = tmp_path / "B.md"
    start, end = markers(OFFLOAD)
    path.write_text(f"# Benchmarks\n\n{start}\n## Offload\nold\n{end}\n\n## Status\n\nhand-written, last\n")
    write_section(path, OFFLOAD, "## Offload\nnew\n")
    assert path.read_text() == f"# Benchmarks\n\n{start}\n## Offload\nnew\n{end}\n\n## Status\n\nhand-written, last\n"


def test_missing_file_gets_a_title(tmp_path):
    path = tmp_path / "new.md"
    write_section(str(path), OFFLOAD, "## Offload\nx")
    start, end = markers(OFFLOAD)
    assert path.read_text() == f"# Benchmarks\n\n{start}\n## Offload\nx\n{end}\n"


def test_read_missing_section_names_the_file_and_section(bench):
    with pytest.raises(ValueError, match="benchmarks/offload.py"):
        read_section(bench, OFFLOAD)


def test_merge_from_copies_one_section(bench, tmp_path):
    device = tmp_path / "device.md"
    write_section(device, PIPELINE, "## Pipeline\nfrom the device")
    write_section(device, OFFLOAD, "## Offload\nnot merged")
    original = bench.read_text()
    merge_from(device, bench, PIPELINE)
    assert read_section(bench, PIPELINE) == "## Pipeline\nfrom the device"
    assert markers(OFFLOAD)[0] not in bench.read_text()
    assert bench.read_text().startswith(original.rstrip("\n") + "\n\n")
    with pytest.raises(SystemExit, match="no benchmarks/offload.py section"):
        merge_from(bench, device, OFFLOAD)


def test_section_ids_of_one_script_per_configuration(tmp_path):
    """benchmarks/pipeline.py writes one section per pp ("benchmarks/pipeline.py pp=2", "... pp=4"); its
    --merge-from copies each of them, and no other script's."""
    path = tmp_path / "B.md"
    write_section(path, "benchmarks/pipeline.py pp=4", "## pp=4")
    write_section(path, "benchmarks/offload.py", "## offload")
    write_section(path, "benchmarks/pipeline.py pp=2", "## pp=2")
    write_section(path, "benchmarks/pipeline.pyx", "## not this one")
    assert section_ids(path, "benchmarks/pipeline.py") == ["benchmarks/pipeline.py pp=4", "benchmarks/pipeline.py pp=2"]
    assert section_ids(path, "benchmarks/offload.py") == ["benchmarks/offload.py"]
