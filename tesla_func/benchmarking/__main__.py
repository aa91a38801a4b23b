"""``python -m tesla_func.benchmarking '<request>'``: the fresh subprocess of
:func:`~tesla_func.benchmarking.measure_rss` (one JSON request in, one JSON line out)."""

import sys

from tesla_func.benchmarking.measure import main

main(sys.argv[1:])
