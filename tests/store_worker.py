"""A process that writes to (or reads from) a store, for the multi-process tests in test_reliability_store.py.

    python store_worker.py write STORE LOG OPTION LIMIT... run a slow fake analysis at each LIMIT in turn,
                                                           appending each computed prompt id to LOG
    python store_worker.py read STORE STOPFILE             read every *.nc of the model folder until STOPFILE exists
    python store_worker.py hold STORE                      hold the model folder's lock until killed

No torch model: the fake analysis sleeps a little per chunk so that runs overlap. Exit code 0 means no error.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import xarray as xr

ROOT = Path(__file__).resolve().parents[1]
SLUG = "fake"


class FakeModel:
    slug = store_folder = SLUG

    def provenance(self) -> dict[str, str]:
        return {"model_id": "fake/model", "dtype": "float32"}


def value(prompt_id: str) -> np.ndarray:
    seed = sum(map(ord, prompt_id))
    return np.random.default_rng(seed).normal(size=4)


def write(store: str, log: str, option: str, limits: list[int]) -> None:
    from nnethics.engine import run_function
    from nnethics.prompts import load_prompts

    prompts = load_prompts(ROOT / "prompts")

    def fn(model, pairs):
        with open(log, "a", encoding="utf-8") as f:
            f.write("".join(p.prompt_id + "\n" for p in pairs))
        time.sleep(0.05 * len(pairs))
        return xr.Dataset({"value": (("prompt", "layer"), np.stack([value(p.prompt_id) for p in pairs]))},
                          coords={"prompt": [p.prompt_id for p in pairs], "layer": np.arange(4)})

    for limit in limits:
        run_function("fake", fn, FakeModel(), prompts.subset(limit=limit), store, {"o": option}, batch_size=2,
                     progress=False)


def read(store: str, stop: str) -> None:
    from nnethics.store import load

    folder = Path(store) / SLUG
    reads = 0
    while not Path(stop).exists():
        for path in folder.glob("*.nc") if folder.exists() else []:
            try:
                ds = load(path)
            except FileNotFoundError:
                continue  # replaced between glob and open: fine, the next round reads the new one
            assert ds.sizes["prompt"] == len(set(ds["prompt"].values.tolist())), "duplicate prompts"
            assert np.isfinite(ds["value"].values).all(), "incomplete values"
            reads += 1
    print(f"reads {reads}")


def hold(store: str) -> None:
    from nnethics.store import store_lock

    with store_lock(Path(store) / SLUG, timeout=0):
        print("holding", flush=True)
        time.sleep(600)


if __name__ == "__main__":
    cmd, store, *rest = sys.argv[1:]
    if cmd == "write":
        write(store, rest[0], rest[1], [int(x) for x in rest[2:]])
    elif cmd == "read":
        read(store, rest[0])
    else:
        hold(store)
