"""Shards in tests: reading every sample's files back, and appending raw (possibly broken) members."""

import io
import tarfile


def read_samples(out_dir):
    """``[{field: bytes}]`` of every sample of the ``*.tar`` shards in ``out_dir`` (sorted by name)."""
    samples = {}
    for shard in sorted(out_dir.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, field = member.name.split(".", 1)
                samples.setdefault(key, {})[field] = tar.extractfile(member).read()
    return list(samples.values())


def append_members(shard, members):
    """Append ``(name, payload bytes)`` members to an existing tar shard."""
    with tarfile.open(shard, "a") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
