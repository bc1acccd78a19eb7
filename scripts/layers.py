#!/usr/bin/env python3
"""Checks turnpike's layering (docs/DESIGN.md#layers): a module may use modules of its own layer
or below, never above. The order is the list below, lowest first; `billing::compensator` (an
actor over the database) sits above the pure rest of `billing`. Exits 1 naming every upward
`crate::` reference; run by .ci/run."""
import pathlib
import re
import sys

LAYERS = [
    "buffers",
    "num",
    "utc",
    "ids",
    "protocol",
    "record",
    "billing",
    "config",
    "telemetry",
    "db",
    "actors",
    "auth",
    "manage",
    "export",
    "continuation",
    "upstream",
    "sim",
    "accounting",
    "billing::compensator",
    "pool",
    "session",
    "http",
    "admin",
    "app",
    "cli",
]
RANK = {name: i for i, name in enumerate(LAYERS)}
REF = re.compile(r"\bcrate::([a-z_]+)(?:::([a-z_]+))?")


def layer_of_file(rel: pathlib.Path) -> str:
    parts = rel.with_suffix("").parts
    if parts[0] == "billing" and len(parts) > 1 and parts[1] == "compensator":
        return "billing::compensator"
    return parts[0]


def layer_of_ref(top: str, sub: str | None) -> str:
    if top == "billing" and sub == "compensator":
        return "billing::compensator"
    return top


def main() -> int:
    src = pathlib.Path(__file__).resolve().parent.parent / "src"
    problems = []
    for path in sorted(src.rglob("*.rs")):
        rel = path.relative_to(src)
        if rel.parts[0] in ("lib.rs", "main.rs"):
            continue
        me = layer_of_file(rel)
        if me not in RANK:
            problems.append(f"{rel}: module {me!r} has no layer in scripts/layers.py")
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("//")[0]
            for top, sub in REF.findall(code):
                other = layer_of_ref(top, sub or None)
                if other == me or other not in RANK:
                    continue
                if RANK[other] > RANK[me]:
                    problems.append(f"{rel}:{n}: {me} (layer {RANK[me]}) uses {other} (layer {RANK[other]}), a higher layer")
    for p in problems:
        print(p)
    print(f"layers: {'1 failed' if problems else '1 passed'} ({len(problems)} upward references)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
