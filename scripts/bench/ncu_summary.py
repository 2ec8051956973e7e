#!/usr/bin/env python3
"""Sums an ncu CSV of gpu__time_duration.sum per kernel name: launches, total and mean
microseconds, largest first, and the window's total. Usage: python3 ncu_summary.py FILE.csv
(the output of `ncu --csv --metrics gpu__time_duration.sum ...`)."""
import csv
import sys
from collections import defaultdict


def main():
    rows = list(csv.DictReader(line for line in open(sys.argv[1]) if line.startswith('"')))
    total, count = defaultdict(float), defaultdict(int)
    for r in rows:
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        scale = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}.get(r["Metric Unit"], 1.0)
        name = r["Kernel Name"].split("(")[0][:60]
        total[name] += float(r["Metric Value"].replace(",", "")) * scale
        count[name] += 1
    print(f"{'kernel':60s} {'n':>5s} {'total us':>10s} {'mean us':>9s}")
    for name in sorted(total, key=total.get, reverse=True):
        print(f"{name:60s} {count[name]:5d} {total[name]:10.1f} {total[name] / count[name]:9.1f}")
    print(f"{'all':60s} {sum(count.values()):5d} {sum(total.values()):10.1f}")


if __name__ == "__main__":
    main()
