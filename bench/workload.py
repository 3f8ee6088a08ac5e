"""The keys and values of the side-by-side measurements, the same for the store and etcd.

Built from the :class:`~bench.profile.Profile` alone, so a process of its
own (etcd's load driver) makes exactly the keys the benchmark process makes.
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.profile import Profile


@dataclass
class Workload:
    """The keys and values every system is given, the same for the store and etcd."""

    value: bytes
    get_keys: list[str]
    put_keys: list[str]
    prefixes: list[str]
    """Subtrees of ``batch_size`` keys each; etcd reads them as ``prefix + '/'``."""
    prefix_keys: list[str]
    batches: list[list[str]]

    @classmethod
    def make(cls, profile: Profile) -> Workload:
        size = profile.batch_size
        prefixes = [f"/bench/prefix/p{j:03d}" for j in range(profile.prefix_subtrees)]
        return cls(
            value=bytes(i % 256 for i in range(profile.value_bytes)),
            get_keys=[f"/bench/get/k{i:06d}" for i in range(profile.keys)],
            put_keys=[f"/bench/put/k{i:06d}" for i in range(profile.keys)],
            prefixes=prefixes,
            prefix_keys=[f"{p}/k{i:03d}" for p in prefixes for i in range(size)],
            # More batches than requests in flight: no two concurrent batches share keys.
            batches=[[f"/bench/batch/b{j:03d}/k{i:03d}" for i in range(size)]
                     for j in range(128)],
        )

    @property
    def populated_keys(self) -> list[str]:
        """The keys written before any measurement: those gets and subtree reads find."""
        return self.get_keys + self.prefix_keys
