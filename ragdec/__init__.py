"""ragdec: fast retrieval-augmented and conversational answering.

Heavy libraries (torch, transformers, faiss) are imported where they are used, so that
importing ragdec and running ``ragdec --help`` stay fast.

The answering stack, as `ragdec ask` builds it (``ragdec.app.build``; loaded on first use)::

    from ragdec import StackSettings, build_stack

    pipeline = build_stack(StackSettings(store="docs.store"))
"""

__version__ = "0.1.0"


def lazy_exports(package: str, exports: dict[str, str]):
    """A module ``__getattr__`` for ``package`` that imports ``name`` from its submodule
    ``exports[name]`` on first use, so importing the package stays light.

    Example: in ragdec/cache/__init__.py, ``__getattr__ = lazy_exports(__name__,
    {"QACache": "lookup"})`` makes ``from ragdec.cache import QACache`` import
    ragdec.cache.lookup then, and only then.
    """
    import importlib

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f".{exports[name]}", package), name)

    return __getattr__


# the Python API's front door: the builder every entry point uses, with its defaults
__getattr__ = lazy_exports(__name__, {"build_stack": "app.build", "StackSettings": "app.build"})
