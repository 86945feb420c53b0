"""Print a bench ``results.json`` as the Markdown table used in BENCHMARKS.md.

Usage: python benchmarks/to_markdown.py anyorder-bench/<timestamp>/results.json
"""

import sys

from anyorder.bench.report import format_table, load_results

if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    result = load_results(sys.argv[1])
    print(f"seed {result.seed}, suite {result.suite}, {result.machine}\n")
    print(format_table(result, markdown=True))
