"""cilia's own image, built from the Dockerfile by packaging/image/build.sh (buildah, a
debootstrapped base, no registry), cached outside the checkout."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

BUILD_SCRIPT = Path(__file__).resolve().parents[2] / "packaging" / "image" / "build.sh"


class ImageError(RuntimeError):
    pass


@dataclass(frozen=True)
class Image:
    name: str      # docker.io/library/cilia:TAG, as containerd stores it
    archive: Path  # a docker-archive for `ctr images import`

    @property
    def repository(self) -> str:
        return self.name.rsplit(":", 1)[0].removeprefix("docker.io/library/")

    @property
    def tag(self) -> str:
        return self.name.rsplit(":", 1)[1]


def build(tag: str | None = None) -> Image:
    """Builds the image (or finds it built; progress on stderr)."""
    if not BUILD_SCRIPT.exists():
        raise ImageError(f"{BUILD_SCRIPT} not found: the image is built from a checkout")
    res = subprocess.run(["bash", str(BUILD_SCRIPT), *(["--tag", tag] if tag else [])],
                         stdout=subprocess.PIPE, text=True)
    lines = res.stdout.strip().splitlines()
    if res.returncode != 0 or len(lines) < 2:
        raise ImageError(f"building cilia's image failed (output above): {BUILD_SCRIPT}")
    return Image(lines[-2], Path(lines[-1]))
