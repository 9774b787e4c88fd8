"""Uploaded volumes: saved within a size limit into a private directory, recognised by their bytes (not
their names), read with the same validation as the CLI, then deleted: only voxels and geometry stay.

Nothing a client sends is unpickled or torch.load'ed; a zip may hold one DICOM series and is
extracted with checks against path traversal and zip bombs.
"""
from __future__ import annotations

import shutil
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from ..errors import VolumeError
from ..volume_io import load_volume
from .errors import ApiError

CHUNK = 1 << 20
MAX_ZIP_FILES = 5000
ZIP_EXPANSION_LIMIT = 4        # uncompressed DICOM may be at most this many times the upload limit

_SUFFIX = {"nrrd": ".nrrd", "nifti": ".nii", "nifti_gz": ".nii.gz", "metaimage": ".mha", "zip": ".zip"}


async def save_upload(upload, folder: Path, max_bytes: int) -> Path:
    """Stream `upload` to `folder`, refusing it (413) as soon as it passes `max_bytes`."""
    path = folder / "upload.bin"
    size = 0
    with open(path, "wb") as handle:
        while chunk := await upload.read(CHUNK):
            size += len(chunk)
            if size > max_bytes:
                raise ApiError(413, "upload_too_large", f"The volume is larger than the server's limit of "
                               f"{max_bytes // 2**20} MB.", "Send a smaller volume, or start the server with a "
                               "larger --max-upload-mb.")
            handle.write(chunk)
    if size == 0:
        raise ApiError(400, "empty_file", "The uploaded volume file is empty.", "Attach the volume file itself.")
    return path


def sniff(path: Path) -> str:
    """The file's kind from its first bytes: nrrd, nifti, nifti_gz, metaimage, zip; ApiError otherwise."""
    with open(path, "rb") as handle:
        head = handle.read(352)
    if head.startswith(b"NRRD"):
        return "nrrd"
    if head.startswith(b"\x1f\x8b"):
        return "nifti_gz"
    if len(head) >= 348 and head[344:348] in (b"n+1\0", b"n+2\0"):
        return "nifti"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    text = head.lstrip()
    if text.startswith((b"ObjectType", b"NDims")):
        return "metaimage"
    what = "a PNG image" if head.startswith(b"\x89PNG") else "a JPEG image" if head.startswith(b"\xff\xd8") else \
        "not a recognised volume format"
    raise ApiError(415, "unsupported_file", f"The uploaded file is {what}.",
                   "Send a 3D volume as NRRD, NIfTI (.nii/.nii.gz), MHA, or a .zip of one DICOM series.")


def _extract_dicom_zip(path: Path, folder: Path, max_bytes: int) -> Path:
    target = folder / "dicom"
    target.mkdir()
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise ApiError(422, "bad_volume", "The zip file is damaged.", "Zip the DICOM series folder again.") from exc
    with archive:
        members = [m for m in archive.infolist() if not m.is_dir()]
        if not members or len(members) > MAX_ZIP_FILES:
            raise ApiError(422, "bad_volume", f"The zip holds {len(members)} files.",
                           f"Send a zip of one DICOM series (1 to {MAX_ZIP_FILES} files).")
        if sum(m.file_size for m in members) > max_bytes * ZIP_EXPANSION_LIMIT:
            raise ApiError(413, "upload_too_large", "The zip expands beyond the server's size limit.",
                           "Send a smaller series.")
        for index, member in enumerate(members):
            name = PurePosixPath(member.filename)
            if name.is_absolute() or ".." in name.parts:
                raise ApiError(422, "bad_volume", "The zip holds a file outside its own folder.",
                               "Zip the DICOM series folder again.")
            # Flat, numbered names: nothing from the archive decides where a file lands.
            with archive.open(member) as source, open(target / f"{index:05d}.dcm", "wb") as sink:
                shutil.copyfileobj(source, sink, CHUNK)
    return target


def read_volume(path: Path, folder: Path, max_bytes: int):
    """Validated SimpleITK image from a saved upload (VolumeError -> 422 with its message and hint)."""
    kind = sniff(path)
    source = path.with_name("volume" + _SUFFIX[kind])
    path.rename(source)
    if kind == "zip":
        source = _extract_dicom_zip(source, folder, max_bytes)
    try:
        return load_volume(source)
    except VolumeError as exc:
        raise ApiError(422, exc.code, exc.message, exc.hint) from exc


def private_folder(root: Path) -> Path:
    """A fresh 0700 directory under `root` for one upload."""
    return Path(tempfile.mkdtemp(prefix="upload-", dir=root))
