"""``python -m fastres.info [--json]``: ``fastres.info()`` as a table or as JSON.

The function itself lives in ``fastres/_info.py`` (the package does not import
this module, so ``fastres.info`` stays the function).
"""
from fastres._info import main

if __name__ == "__main__":
    main()
