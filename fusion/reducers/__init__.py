"""Visual-token reducers and budgets: one run of tokens ``(B, N, C)`` to at most ``k``.

:mod:`.base` holds the interface and the registry (``create_reducer``, ``list_reducers``);
each other module registers one reducer on import (``tome``, ``visionzip``, ``text_guided``,
``in_order``); :mod:`.budget` turns a budget in the model config into ``k`` per run.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
