"""Each benchmark script's own section of BENCHMARKS.md, kept between two HTML comment lines::

    <!-- benchmarks/pipeline.py -->
    ## Pipeline schedules under DeepSpeed (benchmarks/pipeline.py)
    ...
    <!-- end benchmarks/pipeline.py -->

A script rewrites only what lies between its own two marker lines (or appends the block at the end of the file the
first time), so the hand-written parts of BENCHMARKS.md (its title, the "## Status" section) are never touched.

Copy a section measured on the device machine (written there with ``--out``/``--output $OUT/BENCHMARKS.md``) into
this checkout's BENCHMARKS.md::

    python benchmarks/report.py --merge-from /path/to/fetched/BENCHMARKS.md --section benchmarks/offload.py
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

NEW_FILE = "# Benchmarks\n"


def markers(section_id: str) -> tuple[str, str]:
    """The opening and closing marker lines of ``section_id`` (a script path such as ``benchmarks/offload.py``)."""
    return f"<!-- {section_id} -->", f"<!-- end {section_id} -->"


def _find(lines: list[str], section_id: str) -> tuple[int, int] | None:
    """Line indices of the section's opening and closing markers, or None when the section is absent."""
    start_marker, end_marker = markers(section_id)
    try:
        start = lines.index(start_marker)
        end = lines.index(end_marker, start + 1)
    except ValueError:
        return None
    return start, end


def read_section(path: str | os.PathLike, section_id: str) -> str:
    """The text between ``section_id``'s markers in ``path`` (no leading/trailing blank lines).

    Raises ValueError when the file does not hold that section."""
    lines = Path(path).read_text().splitlines()
    found = _find(lines, section_id)
    if found is None:
        start_marker, end_marker = markers(section_id)
        raise ValueError(f"{path} has no {section_id} section (no '{start_marker}' ... '{end_marker}' lines)")
    start, end = found
    return "\n".join(lines[start + 1:end]).strip("\n")


def write_section(path: str | os.PathLike, section_id: str, text: str) -> None:
    """Put ``text`` between ``section_id``'s markers in ``path``: replaces the old section in place, else appends
    it at the end (creating the file with a "# Benchmarks" title if needed). Everything else stays as it was."""
    path = Path(path)
    start_marker, end_marker = markers(section_id)
    block = [start_marker, *text.strip("\n").splitlines(), end_marker]
    old = path.read_text() if path.exists() else NEW_FILE
    lines = old.splitlines()
    found = _find(lines, section_id)
    if found is None:
        head = old.rstrip("\n")
        new = (head + "\n\n" if head else "") + "\n".join(block) + "\n"
    else:
        start, end = found
        new = "\n".join(lines[:start] + block + lines[end + 1:]) + "\n"
    path.write_text(new)


def section_ids(path: str | os.PathLike, prefix: str) -> list[str]:
    """Ids of the sections in ``path`` whose id is ``prefix`` or starts with ``prefix + " "`` (a script that writes
    one section per configuration, e.g. ``benchmarks/pipeline.py pp=2``), in file order."""
    ids = []
    for line in Path(path).read_text().splitlines():
        if line.startswith("<!-- ") and line.endswith(" -->") and not line.startswith("<!-- end "):
            section_id = line[len("<!-- "):-len(" -->")]
            if section_id == prefix or section_id.startswith(prefix + " "):
                ids.append(section_id)
    return ids


def merge_from(source: str | os.PathLike, target: str | os.PathLike, section_id: str) -> None:
    """A script's ``--merge-from``: copy ``section_id`` from ``source`` (e.g. a BENCHMARKS.md fetched from the device)
    into ``target``. Exits with a one-line message when ``source`` lacks the section."""
    try:
        section = read_section(source, section_id)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    write_section(target, section_id, section)
    print(f"merged the {section_id} section of {source} into {target}")


def main(argv: list[str] | None = None) -> None:
    root = Path(__file__).resolve().parents[1]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--merge-from", required=True, help="markdown file that holds the section (e.g. from the device)")
    p.add_argument("--section", required=True, action="append",
                   help="section to copy, named by its script (benchmarks/offload.py); repeat for several")
    p.add_argument("--output", default=str(root / "BENCHMARKS.md"), help="markdown file to update")
    args = p.parse_args(argv)
    for section_id in args.section:
        merge_from(args.merge_from, args.output, section_id)


if __name__ == "__main__":
    main()
