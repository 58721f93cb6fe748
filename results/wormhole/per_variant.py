"""Each variant's final validation number at every grid point of a Wormhole C-phase sweep (read
from the trials' summary.json; validation tasks only), as a markdown table, and each variant's own
best grid point. Usage: python results/wormhole/per_variant.py SWEEP_DIR [SWEEP_DIR ...]"""
import json
import sys
from pathlib import Path

KEYS = ("val_ce", "val_mse", "val_error")  # whichever the experiment reports


def table(sweep: Path) -> list[str]:
    result = json.loads((sweep / "sweep.json").read_text())
    rows, best = [], {}
    trials = [t for t in result["trials"] if t["state"] == "complete"]
    for t in sorted(trials, key=lambda t: (t["params"]["c_steps"], t["params"]["c_lr"])):
        summary = sweep / t["folder"] / "summary.json"
        point = f"{t['params']['c_steps']} x {t['params']['c_lr']:g}"
        if not summary.exists():  # training diverged: no summary
            rows.append((point, None))
            continue
        variants = json.loads(summary.read_text())["variants"]
        cells = {}
        for name, v in variants.items():
            key = next(k for k in KEYS if k in v)
            cells[name] = v[key]
            if v[key] is not None and (name not in best or v[key] < best[name][1]):
                best[name] = (point, v[key])
        rows.append((point, cells))
    names = sorted({n for _, c in rows if c for n in c}, key=lambda n: int(n.rsplit("-", 1)[1][:-4]))
    out = [f"### {sweep.name} ({result['objective']}; rows: c_steps x c_lr)", "",
           "| C phase | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for point, cells in rows:
        out.append(f"| {point} | " + " | ".join("diverged" if cells is None or cells[n] is None else f"{cells[n]:.4g}"
                                              for n in names) + " |")
    out += ["", "Best per variant: " + "; ".join(f"{n}: {best[n][0]} ({best[n][1]:.4g})" for n in names), ""]
    return out


if __name__ == "__main__":
    print("\n".join(line for d in sys.argv[1:] for line in table(Path(d))))
