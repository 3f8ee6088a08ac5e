"""Higher-level patterns on top of the client, in the manner of kazoo's recipes."""

from kvstore.recipe.tree_cache import ChildrenWatch, DataWatch, TreeCache

__all__ = ["ChildrenWatch", "DataWatch", "TreeCache"]
