"""Expert families, one module each.

Importing this package imports every module in it, and each module registers its presets:
adding a family is dropping one module here, nothing else.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
