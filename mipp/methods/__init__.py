"""Selection methods, one file per method; importing this package registers every one.

    from mipp.methods.allocation import select
    selection = select(ctx)        # ctx.config.method under ctx.config.allocation

A new method is one file here that registers itself under its file name with
`mipp.method_registry.register_method` (see that module for the two contracts: a scorer or a
chooser); the CLI's `--method`, `PruneConfig.method` and the API schema offer it from then on.
"""

from importlib import import_module

from mipp.method_registry import method_files, registered

for _name in method_files():
    import_module(f"mipp.methods.{_name}")

# A file must register the method it is named after: the torch-free listing relies on it.
_missing = [n for n in method_files() if n not in registered()]
if _missing:
    raise ImportError(f"mipp/methods/{_missing[0]}.py registers no method named {_missing[0]!r}")

