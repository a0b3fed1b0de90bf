"""`dapo data`: the named data sets (the presets' hub files and `dapo eval`'s bench: sets), where each comes from
and whether it is present here."""

from __future__ import annotations

from pipeline.flow.data import NAMED_SETS, data_dir, hub_cached, local_copy
from pipeline.runtime.evaluate import EVAL_SETS


def data_main(argv: list[str]) -> int:
    """`dapo data`: the named sets (presets' hub files and `dapo eval`'s bench: sets), where from, and if present."""
    import argparse

    argparse.ArgumentParser(prog="dapo data", description=data_main.__doc__).parse_args(argv)
    print(f"data directory (DAPO_DATA_DIR): {data_dir()}")
    rows = [("name", "source", "present")]
    for name, s in NAMED_SETS.items():
        here = local_copy(s.source) or hub_cached(s.source)
        rows.append(
            (name, s.source, str(here) if here else f"no (download, or put {s.local_names[0]} in the data dir)")
        )
    for name, (file, _, _) in EVAL_SETS.items():
        path = data_dir() / file
        rows.append((f"bench:{name}", file, str(path) if path.is_file() else "no (put it in the data directory)"))
    width = [max(len(r[i]) for r in rows) for i in range(2)]
    for r in rows:
        print(f"{r[0]:<{width[0]}}  {r[1]:<{width[1]}}  {r[2]}")
    return 0
