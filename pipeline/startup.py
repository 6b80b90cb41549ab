"""A command's start-up without Python's full garbage collections.

CPython's collector runs a full collection, over every object it tracks, whenever the
objects that have survived two younger collections grow by a quarter since the last full
one (`long_lived_pending > long_lived_total / 4` in CPython's Modules/gcmodule.c; see the
`gc.set_threshold` docs). Importing torch, torchvision, MLflow, SQLAlchemy and matplotlib
grows the heap in exactly that way: a `pipeline train --epochs 1` on the offline sample ran
9 full collections before its first training step, 1.1 s of its 6 s, and freed next to
nothing, as imported modules are not garbage.

`postpone_full_collections()`, first thing in a command, turns full collections off; the
young generations are still collected, so short-lived cycles are still freed. `settle()`,
once the command's heavy imports are done (its first run opens, or its training loop
starts), moves every object that exists then into the permanent generation (`gc.freeze`,
which the `gc` docs describe for objects that live as long as the process), and turns full
collections on again: from then on they walk only the objects made since.
"""

from __future__ import annotations

import gc

_NEVER = 2**31 - 1  # a full-collection threshold the oldest generation's count never reaches

_postponed: tuple[int, int, int] | None = None  # the thresholds to restore, while postponed


def postpone_full_collections() -> None:
    """Turn off full collections until `settle()`; a second call does nothing."""
    global _postponed
    if _postponed is None:
        _postponed = gc.get_threshold()
        gc.set_threshold(_postponed[0], _postponed[1], _NEVER)


def settle() -> None:
    """Freeze the objects that exist now and turn full collections on again, if they were
    postponed; else nothing. Idempotent: only the first call after `postpone` acts."""
    global _postponed
    if _postponed is None:
        return
    gc.freeze()
    gc.set_threshold(*_postponed)
    _postponed = None
