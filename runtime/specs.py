"""Input/output descriptions as recorded in export.json and artifact.json."""

from __future__ import annotations

from dataclasses import dataclass

from bndeploy.errors import ArtifactError


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple  # ints; a str or None marks a dynamic dimension
    dtype: str
    role: str | None = None  # "output", "running_mean", "running_var" (outputs only)
    batchnorm: str | None = None
    batch_count: int | None = None  # n, the elements reduced per channel (running_var only)

    def describe(self) -> str:
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name}: {self.dtype}[{dims}]"

    @classmethod
    def from_manifest(cls, entry: dict, where: str) -> "TensorSpec":
        try:
            return cls(
                name=str(entry["name"]),
                shape=tuple(entry["shape"]),
                dtype=str(entry["dtype"]),
                role=entry.get("role"),
                batchnorm=entry.get("batchnorm"),
                batch_count=entry.get("batch_count"),
            )
        except (KeyError, TypeError) as e:
            raise ArtifactError(f"{where}: malformed tensor entry {entry!r} (missing {e})") from None


def specs_from_manifest(manifest: dict, key: str, where: str) -> list[TensorSpec]:
    entries = manifest.get(key)
    if not isinstance(entries, list) or not entries:
        raise ArtifactError(f"{where}: manifest lists no {key}")
    return [TensorSpec.from_manifest(e, where) for e in entries]


def describe_all(specs: list[TensorSpec]) -> str:
    return "; ".join(s.describe() for s in specs)
