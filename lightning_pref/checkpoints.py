"""Reading checkpoints without running code a crafted one may carry: plain data only, in every format.

Every checkpoint format a run writes is pickle-based, and plain unpickling calls whatever the pickle asks for.
Lightning loads a single ``.ckpt`` with ``weights_only=True``, but DeepSpeed loads its ZeRO files with
``weights_only=False``, and ``torch.distributed.checkpoint`` (FSDP2) unpickles a directory's ``.metadata`` with
plain ``pickle`` and its non-tensor items with ``weights_only=False``. This module reads each pickled part as
plain data instead:

* files ``torch.save`` wrote (a ``.ckpt``; every ``.pt`` of a ZeRO directory; an FSDP2 directory's ``meta.pt``
  and non-tensor items): ``torch.load(weights_only=True)``, which rebuilds tensors, containers, numbers and
  strings only, and, in a ZeRO directory, the three plain-data classes DeepSpeed pickles there
  (``deepspeed_classes``);
* an FSDP2 directory's ``.metadata``: ``MetadataUnpickler``, which admits only the metadata dataclasses
  of ``torch.distributed.checkpoint`` and the few torch types they hold.

A pickle that refers to anything else is refused with one [`CheckpointError`][lightning_pref.errors.CheckpointError]
line naming the file, the global it wanted and the opt-in (``trust_pickle=True``; each caller passes
``opt_in`` to name its own flag), which restores the libraries' unrestricted loading for checkpoints your own
runs wrote.

``check_readable`` opens every pickled part that way before anything loads the checkpoint (so errors are
clear); ``loading`` then makes DeepSpeed's and ``torch.distributed.checkpoint``'s own loads plain-data
too (so a file changed since the check, or a tensor item the check does not open, cannot run code either).

Writing: [`AtomicCheckpointIO`][lightning_pref.checkpoints.AtomicCheckpointIO] writes a single-file checkpoint
beside its destination and renames it into place, so a crash mid-write never leaves a truncated checkpoint,
and a write that fails is an error naming the path.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from enum import Enum
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta

from lightning_pref.errors import CheckpointError, MissingFileError

PYTHON_OPT_IN = "trust_pickle=True"


class CheckpointFormat(Enum):
    """How a checkpoint lies on disk: a single ``.ckpt``, a DeepSpeed ZeRO directory, an FSDP2 directory."""

    FILE = "file"
    DEEPSPEED = "deepspeed"
    DISTRIBUTED = "distributed"


def checkpoint_format(path: Path) -> CheckpointFormat:
    """The format of the checkpoint at ``path``, from its layout alone (nothing is unpickled)."""
    if not path.exists():
        raise MissingFileError(
            f"{path} does not exist: expected a .ckpt file or a DeepSpeed / FSDP2 checkpoint directory."
        )
    if path.is_file():
        return CheckpointFormat.FILE
    if (path / "latest").is_file():
        return CheckpointFormat.DEEPSPEED
    if (path / ".metadata").is_file():
        return CheckpointFormat.DISTRIBUTED
    raise CheckpointError(
        f"{path} is a directory but neither a DeepSpeed checkpoint (no 'latest' file) nor an FSDP2 distributed "
        "checkpoint (no '.metadata'): pass the .ckpt path Lightning wrote."
    )


def check_readable(path: Path, trust_pickle: bool = False, opt_in: str = PYTHON_OPT_IN) -> None:
    """Open every pickled part of the checkpoint at ``path`` as plain data, so that a crafted, damaged or
    incomplete checkpoint is refused with one line before anything loads it. ``trust_pickle`` checks the
    layout only."""
    kind = checkpoint_format(path)
    zero_files = deepspeed_files(path) if kind is CheckpointFormat.DEEPSPEED else []  # trusted or not
    if trust_pickle:
        return
    if kind is CheckpointFormat.FILE:
        load_plain(path, opt_in)
    elif kind is CheckpointFormat.DEEPSPEED:
        allowed = deepspeed_classes()
        for file in zero_files:
            load_plain(file, opt_in, allowed)
    else:
        check_distributed(path, opt_in)


def loading(path: Path, trust_pickle: bool = False, opt_in: str = PYTHON_OPT_IN) -> AbstractContextManager:
    """The context to load the checkpoint at ``path`` in: ``restricted_loading``, or nothing when trusted."""
    return nullcontext() if trust_pickle else restricted_loading(path, opt_in)


@contextmanager
def restricted_loading(path: Path, opt_in: str = PYTHON_OPT_IN) -> Iterator[None]:
    """Inside, the libraries load checkpoints as plain data, whatever they ask for.

    Every ``torch.load`` is weights-only even where DeepSpeed or ``torch.distributed.checkpoint`` pass
    ``weights_only=False`` (torch's own ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` switch), with the classes the format
    needs admitted, and ``FileSystemReader`` reads ``.metadata`` through ``MetadataUnpickler``. All three
    are process-wide while the context lasts: enter it around a load only.
    """

    def read_metadata_restricted(reader: FileSystemReader, *args: Any, **kwargs: Any) -> Metadata:
        # FileSystemReader.read_metadata with the restricted unpickler in place of pickle.load
        metadata = read_metadata(Path(reader._get_metadata_path(kwargs.get("rank"))), opt_in)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = reader.load_id
        return metadata

    allowed = deepspeed_classes() if checkpoint_format(path) is CheckpointFormat.DEEPSPEED else []
    with (
        mock.patch.dict(os.environ, {"TORCH_FORCE_WEIGHTS_ONLY_LOAD": "1"}),
        torch.serialization.safe_globals(allowed),
        mock.patch.object(FileSystemReader, "read_metadata", read_metadata_restricted),
    ):
        os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)  # torch refuses the two switches set together
        yield


# ----------------------------------------------------------------------------- files torch.save wrote
def load_plain(source: Path | bytes, opt_in: str, allowed: Sequence[type] = (), name: str | None = None) -> Any:
    """A file (or in-memory item) ``torch.save`` wrote, as plain data: ``torch.load(weights_only=True)`` with
    the ``allowed`` classes admitted besides torch's own. ``name`` says where an item came from."""
    name = name or str(source)

    def opened() -> Path | io.BytesIO:
        return source if isinstance(source, Path) else io.BytesIO(source)

    if not zipfile.is_zipfile(opened()):
        raise CheckpointError(
            f"{name} is not a file torch.save writes (a zip archive): it is empty, truncated or corrupt, or in "
            f"torch's legacy format, which loads only with {opt_in}."
        )
    with torch.serialization.safe_globals(list(allowed)):
        try:
            wanted = torch.serialization.get_unsafe_globals_in_checkpoint(opened())  # a scan: nothing is called
            if not wanted:
                return torch.load(opened(), map_location="cpu", weights_only=True, mmap=isinstance(source, Path))
        except Exception as error:
            raise CheckpointError(
                f"{name} is a zip archive but not a file torch.save writes ({type(error).__name__}): it is damaged."
            ) from error
    raise refusal(name, wanted, opt_in)


def deepspeed_classes() -> list[type]:
    """The plain-data classes DeepSpeed pickles into ZeRO-2 / ZeRO-3 optimizer states (fp32 and bf16 runs;
    what ``weights_only=True`` refused in checkpoints of real two-process runs). Rebuilding one sets a few
    numbers on an object and runs no other code."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler  # the static loss scale: cur_scale, dynamic
    from deepspeed.runtime.zero.config import ZeroStageEnum  # an int enum: which ZeRO stage wrote the file
    from deepspeed.utils.tensor_fragment import fragment_address  # a dataclass of two ints: numel, start

    return [LossScaler, ZeroStageEnum, fragment_address]


def deepspeed_files(directory: Path) -> list[Path]:
    """The ``.pt`` files of the tag the ZeRO directory's ``latest`` names (a sub-directory with model states)."""
    tag = (directory / "latest").read_text(errors="replace").strip()
    files = sorted((directory / tag).glob("*.pt")) if tag and lies_in(directory, tag) else []
    if not any(file.name.endswith("model_states.pt") for file in files):
        raise CheckpointError(
            f"{directory / 'latest'} names the tag {tag!r}, but {directory} has no sub-directory of that name "
            "holding *model_states.pt: the DeepSpeed checkpoint is incomplete."
        )
    return files


# ----------------------------------------------------------------------------- distributed checkpoints
#: What an FSDP2 directory's ``.metadata`` may refer to: torch.distributed.checkpoint's metadata dataclasses
#: (rebuilt by setting their fields), plus the torch and standard types they hold, none of which acts on
#: anything when built. torch dtypes (``torch.float32``, ...) are admitted too: see ``MetadataUnpickler``.
METADATA_GLOBALS = {
    *(
        ("torch.distributed.checkpoint.metadata", name)
        for name in (
            "Metadata",
            "StorageMeta",
            "MetadataIndex",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "_MEM_FORMAT_ENCODING",
        )  # the last: an Enum
    ),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),  # a dataclass: file name, offset, length
    ("torch", "Size"),  # a tuple of ints
    ("torch.serialization", "_get_layout"),  # looks a torch.layout up by its name
    ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id: where the run saved it (nothing is opened)
}
TORCH_DTYPES = {name for name, value in vars(torch).items() if isinstance(value, torch.dtype)}


class RefusedGlobal(pickle.UnpicklingError):
    """A global ``MetadataUnpickler`` does not admit; ``name`` is ``module.qualname``."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles a distributed checkpoint's ``.metadata``, admitting only ``METADATA_GLOBALS`` and dtypes."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in METADATA_GLOBALS or (module == "torch" and name in TORCH_DTYPES):
            return super().find_class(module, name)
        raise RefusedGlobal(f"{module}.{name}")


def read_metadata(file: Path, opt_in: str = PYTHON_OPT_IN) -> Metadata:
    """A distributed checkpoint's ``.metadata`` through ``MetadataUnpickler``."""
    try:
        with file.open("rb") as stream:
            metadata = MetadataUnpickler(stream).load()
    except RefusedGlobal as refused:
        raise refusal(str(file), [refused.name], opt_in) from None
    except Exception as error:
        raise CheckpointError(
            f"{file} is not the pickled Metadata torch.distributed.checkpoint writes ({type(error).__name__}): it "
            "is empty, truncated or corrupt."
        ) from error
    if not isinstance(metadata, Metadata):
        raise CheckpointError(
            f"{file} holds a {type(metadata).__name__}, not the Metadata torch.distributed.checkpoint writes."
        )
    return metadata


def check_distributed(directory: Path, opt_in: str) -> None:
    """``.metadata``, every data file it lists, every non-tensor item in them and Lightning's ``meta.pt``.

    Tensor items are left to ``torch.distributed.checkpoint``, which loads each with ``weights_only=True``
    (opening them here would read the whole checkpoint once more).
    """
    metadata = read_metadata(directory / ".metadata", opt_in)
    for index, stored in metadata.storage_data.items():
        file = directory / stored.relative_path
        if not (lies_in(directory, stored.relative_path) and file.is_file()):
            raise CheckpointError(
                f"{directory / '.metadata'} lists the data file {stored.relative_path!r}, which is not in "
                f"{directory}: the distributed checkpoint is incomplete."
            )
        if isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            with file.open("rb") as stream:
                stream.seek(stored.offset)
                load_plain(stream.read(stored.length), opt_in, name=f"{file} (item {index.fqn})")
    if (directory / "meta.pt").is_file():
        load_plain(directory / "meta.pt", opt_in)


# ----------------------------------------------------------------------------- shared
def lies_in(directory: Path, name: str) -> bool:
    """Whether ``directory / name`` is an entry of ``directory`` itself (no ``..``, no sub-path, no symlink out)."""
    return (directory / name).resolve().parent == directory.resolve()


def refusal(name: str, wanted: Sequence[str], opt_in: str) -> CheckpointError:
    """The one-line refusal of a pickle that wants globals outside the allowlist (``repr`` keeps it one line)."""
    return CheckpointError(
        f"{name} refers to the Python global {', '.join(map(repr, wanted))}, which plain checkpoint data never "
        f"needs: not loaded, since unpickling it could run code. If your own run wrote this checkpoint, load it "
        f"with {opt_in}."
    )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's single-file checkpoint writer, made atomic: the checkpoint goes to ``.<name>.partial`` beside
    its destination and is renamed into place (``os.replace``), so a run killed mid-write leaves the previous
    file, never a truncated one. A write that fails (a folder that cannot be written, a full disk) is a
    [`CheckpointError`][lightning_pref.errors.CheckpointError] naming the path, not a run that ends without its
    checkpoints. Remote paths (``s3://...``) are written by Lightning's own writer."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        partial = path.with_name(f".{path.name}.partial")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(checkpoint, partial)
            os.replace(partial, path)
        except OSError as error:
            with suppress(OSError):  # (there may be no folder to hold it)
                partial.unlink(missing_ok=True)
            raise CheckpointError(
                f"could not write the checkpoint {path} ({error.strerror or error}): check that its folder exists, "
                "is writable and has space."
            ) from error
