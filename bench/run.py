"""Run every benchmark and write ``bench/RESULTS.md`` (the README's Performance section shows
it). By hand, never by the tests; on a quiet machine (it prints the load average it saw)::

    .venv/bin/python -m bench            # or: .venv/bin/python bench/run.py
    .venv/bin/python -m bench --only ingest,camera --rounds 3 --output /tmp/results.md

Each benchmark runs its baseline in the same run and reports medians and ratios; absolute
figures belong to the machine named at the top of the file.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import traceback
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

if __package__ in (None, ""):  # run as a script: bench/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import camera, huge_photo, inference, ingest, sockets, tus
from bench.common import ROOT, machine
from bench.report import Section

ALL = ("ingest", "huge_photo", "inference", "camera", "sockets", "tus")


def _versions() -> str:
    names = ("uvicorn", "websockets", "torch", "litserve", "tuspyserver", "tuspy")
    found = []
    for name in names:
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return f"Python {platform.python_version()}, " + ", ".join(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(ALL),
                        help=f"comma-separated subset of {', '.join(ALL)}")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds for every benchmark (default: each one's own)")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "RESULTS.md")
    parser.add_argument("--readme", action="store_true",
                        help="also put the results into README.md, between its markers")
    args = parser.parse_args()
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(ALL))
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}")
    rounds = {} if args.rounds is None else {"rounds": args.rounds}
    load_before = os.getloadavg()
    started = time.time()
    sections: list[Section] = []
    model = None
    for name in ALL:
        if name not in chosen:
            continue
        print(f"running {name} ...", file=sys.stderr, flush=True)
        begun = time.monotonic()
        try:
            if name == "ingest":
                sections.append(ingest.run(**rounds))
            elif name == "huge_photo":
                sections.append(huge_photo.run(**rounds))
            elif name == "inference":
                section, model = inference.run(**rounds)
                sections.append(section)
            elif name == "camera":
                sections.append(camera.run(**rounds, model=model))
            elif name == "sockets":
                sections.append(sockets.run(**rounds))
            elif name == "tus":
                sections.append(tus.run(**rounds))
        except Exception as exc:  # one benchmark's failure must not lose the others' figures
            traceback.print_exc()
            sections.append(Section(key=name, title=f"{name}: failed", intro=f"`{exc!r}`",
                                    header=[], rows=[]))
        print(f"  {name}: {time.monotonic() - begun:.0f} s", file=sys.stderr, flush=True)
    load_after = os.getloadavg()
    header = [
        "# pixelstream benchmark results",
        "",
        f"Machine: {machine()}, {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') >> 30}"
        f" GiB; {platform.platform()}. {_versions()}.",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))} with "
        f"`.venv/bin/python -m bench`, {time.time() - started:.0f} s; load average "
        f"{load_before[0]:.2f} before, {load_after[0]:.2f} after. Client and server share the "
        "machine; servers wait paused (SIGSTOP) while another is measured. Ratios compare "
        "contenders measured in this same run; absolute figures are this machine's.",
    ]
    checks = [check for section in sections for check in section.checks]
    summary = ["", "## Targets", "", "| target | measured | wanted | |", "|---|---|---|---|"]
    summary += [check.markdown_row() for check in checks]
    body = [section.markdown(level=2) for section in sections]
    text = "\n".join(header + summary) + "\n\n" + "\n\n".join(body) + "\n"
    args.output.write_text(text)
    print(text)
    print(f"written to {args.output}", file=sys.stderr)
    if args.readme:
        update_readme(text)


README_START = "<!-- bench/RESULTS.md: start (python -m bench --readme rewrites this) -->"
README_END = "<!-- bench/RESULTS.md: end -->"


def update_readme(results: str, readme: Path = ROOT / "README.md") -> None:
    """Replace what lies between the markers with ``results``, headings one level down."""
    text = readme.read_text()
    start, end = text.index(README_START), text.index(README_END)
    lines = results.splitlines()[1:]  # the file's own title
    body = "\n".join("##" + line if line.startswith("#") else line for line in lines).strip()
    readme.write_text(text[:start + len(README_START)] + "\n\n" + body + "\n\n" + text[end:])
    print(f"and into {readme}", file=sys.stderr)


if __name__ == "__main__":
    main()
