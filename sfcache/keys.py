"""Episode key rules shared by the readers and the loaders, without importing any reader (pyarrow, av, h5py)."""

from __future__ import annotations

__all__ = ["episode_key", "tfds_ids"]


def episode_key(index: int, prefix: str = "") -> str:
    """`episode_<index:06d>`, LeRobot's episode naming (an RLDS store puts its dataset folder in front: `prefix/`)."""
    return f"{prefix}/episode_{int(index):06d}" if prefix else f"episode_{int(index):06d}"


def tfds_ids(shards: list) -> dict[str, str]:
    """{TFDS id: episode key} from an RLDS source's `describe()["tfds_shards"]` ([dataset folder, shard file,
    episodes]): TFDS's `<shard file>__<index>` ids, episodes numbered per dataset folder in shard order."""
    ids, first = {}, {}
    for prefix, file, count in shards:
        start = first.get(prefix, 0)
        ids.update({f"{file}__{i}": episode_key(start + i, prefix) for i in range(int(count))})
        first[prefix] = start + int(count)
    return ids
