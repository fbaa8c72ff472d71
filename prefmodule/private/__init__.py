"""The one place where prefmodule reaches into its libraries' private names.

Lightning, transformers, torch and datasets keep some state and steps private that prefmodule needs (a
checkpoint's save sequence, the loader state a fit restores, a model's per-layer initialisation, the hooks on a
module). Each such reach is a small named function in the module of its library, so that a library release that
renames or drops one breaks a single function, and ``tests/test_private_apis.py`` pins every name these modules
use (and every private hook a prefmodule subclass overrides) on the installed versions, saying which function
needs a new way when one goes.
"""
