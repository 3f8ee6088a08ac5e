"""Unit tests for protocol.keys: validation, segment-wise prefixes and tree order."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import keys
from protocol.errors import BadRequest, InvalidKey

# --- validation -----------------------------------------------------------------


@pytest.mark.parametrize("key", [
    "/a",
    "/cluster/ey04",
    "/cluster/ey04/slice/13",
    "/with space/and-dash_underscore.dot",
    "/...",  # three dots is an ordinary name
    "/.hidden/..x/x..",
    "/ünïcödé/日本語/🙂",
    "/" + "a" * 499,  # exactly 500 bytes
    "/a" * 32,  # exactly 32 segments
])
def test_valid_keys_are_returned_unchanged(key: str) -> None:
    assert keys.validate(key) is key
    assert keys.is_valid(key)


@pytest.mark.parametrize(("key", "why"), [
    ("", "start with '/'"),
    ("a", "start with '/'"),
    ("a/b", "start with '/'"),
    ("cluster/ey04", "start with '/'"),
    ("/a/", "end with '/'"),
    ("//", "end with '/'"),
    ("/a//b", "empty segment"),
    ("//a", "empty segment"),
    ("/.", "'.' segment"),
    ("/a/./b", "'.' segment"),
    ("/..", "'..' segment"),
    ("/a/../b", "'..' segment"),
    ("/a/..", "'..' segment"),
    ("/a\x00b", "control character"),
    ("/a\nb", "control character"),
    ("/a\tb", "control character"),
    ("/a\x1fb", "control character"),
    ("/a\x7fb", "control character"),
    ("/a\x85b", "control character"),  # C1 (NEL)
    ("/a\x9fb", "control character"),
    ("/a\ufffeb", "control character"),
    ("/a\uffffb", "control character"),
    ("/a\ud800b", "UTF-8"),  # a lone surrogate cannot be encoded
])
def test_invalid_keys_are_refused_with_a_reason(key: str, why: str) -> None:
    with pytest.raises(InvalidKey, match=why):
        keys.validate(key)
    assert not keys.is_valid(key)


def test_invalid_key_is_a_bad_request() -> None:
    with pytest.raises(BadRequest):
        keys.validate("relative")


def test_length_is_counted_in_utf8_bytes_not_characters() -> None:
    # "é" is two bytes: 250 of them plus the slash make 501 bytes but 251 characters.
    key = "/" + "é" * 250
    assert len(key) == 251
    with pytest.raises(InvalidKey, match="501 bytes"):
        keys.validate(key)
    # A four-byte character: 124 * 4 + 1 = 497 bytes is fine, 125 * 4 + 1 = 501 is not.
    assert keys.is_valid("/" + "🙂" * 124)
    assert not keys.is_valid("/" + "🙂" * 125)
    assert not keys.is_valid("/" + "a" * 500)


def test_limits_are_configurable() -> None:
    small = keys.KeyLimits(max_bytes=10, max_depth=2)
    assert keys.is_valid("/abcdefghi", small)  # 10 bytes
    assert not keys.is_valid("/abcdefghij", small)  # 11 bytes
    assert keys.is_valid("/a/b", small)
    with pytest.raises(InvalidKey, match="3 segments"):
        keys.validate("/a/b/c", small)


def test_too_deep_is_refused() -> None:
    with pytest.raises(InvalidKey, match="33 segments"):
        keys.validate("/a" * 33)


@pytest.mark.parametrize("key", [None, b"/a", 1, ["/a"], ("/a",)])
def test_non_strings_are_refused(key: object) -> None:
    with pytest.raises(InvalidKey, match="must be a string"):
        keys.validate(key)
    assert not keys.is_valid(key)


def test_root_only_with_allow_root() -> None:
    with pytest.raises(InvalidKey, match="root"):
        keys.validate("/")
    assert not keys.is_valid("/")
    assert keys.validate("/", allow_root=True) == "/"
    assert keys.is_valid("/", allow_root=True)
    # allow_root does not loosen anything else.
    assert not keys.is_valid("//", allow_root=True)
    assert not keys.is_valid("", allow_root=True)


# --- prefixes -------------------------------------------------------------------


def test_prefixes_are_segment_wise() -> None:
    assert keys.is_prefix("/cluster/ey04", "/cluster/ey04/slice")
    assert keys.is_prefix("/cluster/ey04", "/cluster/ey04/slice/13")
    assert keys.is_prefix("/cluster/ey04", "/cluster/ey04")
    assert not keys.is_prefix("/cluster/ey04", "/cluster/ey040")
    assert not keys.is_prefix("/cluster/ey04", "/cluster/ey040/slice")
    assert not keys.is_prefix("/cluster/ey04", "/cluster/ey0")
    assert not keys.is_prefix("/cluster/ey04", "/cluster")
    assert not keys.is_prefix("/cluster/ey04/slice", "/cluster/ey04")
    assert not keys.is_prefix("/a", "/b/a")


def test_root_prefixes_everything() -> None:
    for key in ("/", "/a", "/a/b/c", "/ey040"):
        assert keys.is_prefix("/", key)
        assert keys.overlaps("/", key)
        assert keys.overlaps(key, "/")
    assert not keys.is_prefix("/a", "/")


def test_strict_prefix_and_overlaps() -> None:
    assert keys.is_strict_prefix("/a", "/a/b")
    assert not keys.is_strict_prefix("/a", "/a")
    assert not keys.is_strict_prefix("/a", "/ab")
    assert keys.is_strict_prefix("/", "/a")
    assert not keys.is_strict_prefix("/", "/")
    assert keys.overlaps("/a/b", "/a")
    assert keys.overlaps("/a", "/a/b")
    assert not keys.overlaps("/a", "/ab")
    assert not keys.overlaps("/a/b", "/a/c")


def test_longest_prefix() -> None:
    shards = ["/", "/cluster", "/cluster/ey04", "/cluster/ey04/slice/13"]
    assert keys.longest_prefix("/cluster/ey04/slice", shards) == "/cluster/ey04"
    assert keys.longest_prefix("/cluster/ey04", shards) == "/cluster/ey04"
    assert keys.longest_prefix("/cluster/ey040", shards) == "/cluster"
    assert keys.longest_prefix("/cluster/ey04/slice/13/x", shards) == "/cluster/ey04/slice/13"
    assert keys.longest_prefix("/cluster/ey04/slice/130", shards) == "/cluster/ey04"
    assert keys.longest_prefix("/other", shards) == "/"
    assert keys.longest_prefix("/other", ["/cluster", "/cluster/ey04"]) is None
    assert keys.longest_prefix("/cluster/ey040", ["/cluster/ey04"]) is None
    assert keys.longest_prefix("/a", []) is None
    # The order the candidates come in does not matter.
    assert keys.longest_prefix("/cluster/ey04/x", list(reversed(shards))) == "/cluster/ey04"


def test_child_name() -> None:
    assert keys.child_name("/", "/a") == "a"
    assert keys.child_name("/", "/a/b/c") == "a"
    assert keys.child_name("/a", "/a/b") == "b"
    assert keys.child_name("/a", "/a/b/c") == "b"
    assert keys.child_name("/a/b", "/a/b/ç/d") == "ç"


def test_parent_join_segments_depth() -> None:
    assert keys.parent("/a/b/c") == "/a/b"
    assert keys.parent("/a") == "/"
    assert keys.parent("/") == "/"
    assert keys.join("/", "a") == "/a"
    assert keys.join("/a", "b", "c") == "/a/b/c"
    assert keys.join("/") == "/"
    assert keys.join("/a") == "/a"
    assert keys.segments("/") == []
    assert keys.segments("/a") == ["a"]
    assert keys.segments("/a/b/c") == ["a", "b", "c"]
    assert keys.depth("/") == 0
    assert keys.depth("/a") == 1
    assert keys.depth("/a/b/c") == 3


# --- properties -----------------------------------------------------------------

# Segments from a small alphabet collide and prefix one another often (a, ab, a.b);
# segments from the whole of Unicode exercise the byte order of UTF-8.
_small_segment = st.text(alphabet="ab.-é~ ", min_size=1, max_size=3)
_any_segment = st.text(
    alphabet=st.characters(
        blacklist_categories=("Cs", "Cc"),
        blacklist_characters="/\ufffe\uffff",
    ),
    min_size=1,
    max_size=6,
)
segment = st.one_of(_small_segment, _any_segment).filter(lambda s: s not in (".", ".."))
segment_lists = st.lists(segment, min_size=1, max_size=5)
valid_keys = segment_lists.map(lambda parts: "/" + "/".join(parts))
keys_or_root = st.one_of(st.just("/"), valid_keys)


@given(valid_keys)
def test_generated_keys_are_valid(key: str) -> None:
    assert keys.validate(key) == key


@given(keys_or_root)
def test_tree_order_round_trips(key: str) -> None:
    assert keys.from_tree_order(keys.tree_order(key)) == key


@given(keys_or_root)
def test_segments_join_round_trip(key: str) -> None:
    parts = keys.segments(key)
    assert keys.join("/", *parts) == key
    assert keys.depth(key) == len(parts)
    if parts:
        assert keys.parent(key) == keys.join("/", *parts[:-1])
        assert keys.join(keys.parent(key), parts[-1]) == key


def _model_is_prefix(prefix: str, key: str) -> bool:
    p, k = keys.segments(prefix), keys.segments(key)
    return k[: len(p)] == p


@given(segment_lists, segment_lists, st.integers(min_value=0, max_value=5))
def test_is_prefix_agrees_with_a_segment_list_model(a: list[str], b: list[str],
                                                    share: int) -> None:
    # Make the two keys share their first few segments, so prefixes actually occur.
    b = a[:share] + b
    for prefix, key in (("/" + "/".join(a), "/" + "/".join(b)),
                        ("/" + "/".join(b), "/" + "/".join(a)),
                        ("/" + "/".join(a[:share]) if a[:share] else "/", "/" + "/".join(a))):
        assert keys.is_prefix(prefix, key) == _model_is_prefix(prefix, key)
        if keys.is_prefix(prefix, key) and prefix != key:
            assert keys.child_name(prefix, key) == keys.segments(key)[keys.depth(prefix)]


@given(segment_lists, segment)
def test_a_name_extended_by_characters_is_never_a_child(parts: list[str], extra: str) -> None:
    key = "/" + "/".join(parts)
    assert not keys.is_prefix(key, key + extra)
    assert keys.is_prefix(key, key + "/" + extra)


def _dfs(all_keys: set[str]) -> list[str]:
    """Depth-first walk of the tree the keys span, siblings sorted by name."""
    tree: dict = {}
    for key in all_keys:
        node = tree
        for name in keys.segments(key):
            node = node.setdefault(name, {})
    out: list[str] = []

    def walk(node: dict, path: list[str]) -> None:
        for name in sorted(node):
            child = [*path, name]
            key = "/" + "/".join(child)
            if key in all_keys:
                out.append(key)
            walk(node[name], child)

    if "/" in all_keys:
        out.append("/")
    walk(tree, [])
    return out


@given(st.sets(keys_or_root, max_size=30))
def test_tree_order_is_a_depth_first_walk(all_keys: set[str]) -> None:
    assert sorted(all_keys, key=keys.tree_order) == _dfs(all_keys)


def test_tree_order_examples() -> None:
    ordered = sorted(["/a/b-c", "/ab", "/a/b/c", "/a", "/a/b", "/", "/a-"], key=keys.tree_order)
    assert ordered == ["/", "/a", "/a/b", "/a/b/c", "/a/b-c", "/a-", "/ab"]
