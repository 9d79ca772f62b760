"""``python -m bench``: every benchmark, one Markdown table (see :mod:`bench.run`)."""

from bench.run import main

main()
