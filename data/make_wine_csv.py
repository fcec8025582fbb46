"""Write wine.csv: scikit-learn's bundled wine recognition table (178 wines from three
cultivars, 13 chemical measurements) as a CSV file with a header row, for
pipelines/csv_wine.yaml. No network needed. Run from anywhere:

    python3 data/make_wine_csv.py
"""

from __future__ import annotations

import csv
from pathlib import Path

from sklearn.datasets import load_wine


def main() -> None:
    wine = load_wine()
    out = Path(__file__).resolve().parent / "wine.csv"
    with out.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow([*wine.feature_names, "cultivar"])
        for row, target in zip(wine.data, wine.target, strict=True):
            writer.writerow([f"{v:g}" for v in row] + [wine.target_names[target]])
    print(f"wrote {out} ({len(wine.data)} rows)")


if __name__ == "__main__":
    main()
