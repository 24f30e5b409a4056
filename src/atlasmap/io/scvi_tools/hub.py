"""The scvi-hub directory layout: ``model.pt`` + ``_scvi_required_metadata.json`` + ``adata.h5ad``.

What ``scvi.hub.HubModel.save`` writes (and ``pull_from_huggingface_hub`` downloads): the normal scvi-tools
save (``model.pt``), the training data (``adata.h5ad``, usually *minified*: no counts, the latent posterior
in ``.obsm``; ``mdata.h5mu`` for MuData models), the metadata JSON (``scvi_version``, ``anndata_version``,
``model_cls_name``, ``training_data_url``, ``model_parent_module``) and a model card (``README.md``,
informational). scvi-tools loads a hub model by importing ``model_parent_module`` and calling
``model_cls_name``'s ``load``; atlasmap only uses ``model_cls_name`` to check the file's class, and reads
everything as data (JSON, the safe ``model.pt`` reader, h5ad).

Whether the ``adata.h5ad`` is minified is decided from the AnnData (``uns["_scvi_adata_minify_type"]``) and
the model's registry fields (``field_registries["minify_type"]``, ``latent_qzm``, ...), never from
``setup_args["use_minified"]`` (``SCANVI.from_scvi_model`` always records False there).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atlasmap.data.minified import StoredLatent
from atlasmap.errors import InputError, ModelFileError
from atlasmap.io.scvi_tools.reader import SCVI_TOOLS_MODEL_FILE, ScviToolsCheckpoint

HUB_METADATA_FILE = "_scvi_required_metadata.json"
HUB_ADATA_FILE = "adata.h5ad"
HUB_MUDATA_FILE = "mdata.h5mu"
HUB_LARGE_ADATA_FILE = "large_training_adata.h5ad"


@dataclass(frozen=True)
class HubDirectory:
    """A scvi-tools save directory and what it holds besides ``model.pt``.

    Attributes
    ----------
    path
        The directory.
    metadata
        ``_scvi_required_metadata.json`` (``None``: not a scvi-hub directory, a plain ``model.save``).
    adata_path
        Its ``adata.h5ad`` (``None``: absent).
    """

    path: Path
    metadata: dict[str, Any] | None
    adata_path: Path | None

    @property
    def is_hub(self) -> bool:
        return self.metadata is not None

    def require_adata(self) -> Path:
        """Its ``adata.h5ad``, or an :class:`InputError` naming the missing file."""
        if self.adata_path is None:
            url = (self.metadata or {}).get("training_data_url")
            where = f" (its metadata points to {url}: download it there)" if url else ""
            raise InputError(f"{self.path} has no {HUB_ADATA_FILE}{where}; pass the reference cells explicitly "
                             "(CLI: --with-reference REF.h5ad).")
        return self.adata_path


def hub_directory(dir_path: str | Path, *, prefix: str | None = None) -> HubDirectory:
    """Describe a scvi-tools save directory (plain or scvi-hub layout); ``dir_path`` may be ``model.pt`` itself.

    Raises
    ------
    ModelFileError
        A scvi-hub directory (it has the metadata JSON) that lacks ``model.pt`` or has unreadable metadata, or
        that holds a MuData model (``mdata.h5mu``).
    """
    path = Path(dir_path)
    if path.is_file():
        return HubDirectory(path=path.parent, metadata=None, adata_path=None)
    meta_path = path / HUB_METADATA_FILE
    metadata: dict[str, Any] | None = None
    if meta_path.is_file():
        try:
            metadata = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ModelFileError(f"{meta_path} is not readable JSON ({type(err).__name__}: {err}); the scvi-hub "
                                 "directory is damaged (download it again).") from None
        if not isinstance(metadata, dict):
            raise ModelFileError(f"{meta_path} does not hold a JSON object; the scvi-hub directory is damaged.")
        model_file = path / f"{prefix or ''}{SCVI_TOOLS_MODEL_FILE}"
        if not model_file.is_file():
            raise ModelFileError(f"the scvi-hub directory {path} lacks {model_file.name} (it has "
                                 f"{HUB_METADATA_FILE}); download the model again, or point to the directory that "
                                 "holds model.pt.")
    if (path / HUB_MUDATA_FILE).is_file() and not (path / HUB_ADATA_FILE).is_file():
        raise ModelFileError(f"{path} holds a MuData model ({HUB_MUDATA_FILE}); atlasmap imports AnnData models.")
    adata_path = path / HUB_ADATA_FILE
    return HubDirectory(path=path, metadata=metadata, adata_path=adata_path if adata_path.is_file() else None)


def is_scvi_tools_save(path: str | Path) -> bool:
    """Whether ``path`` looks like a scvi-tools save (a ``model.pt``, or a directory with one or with scvi-hub
    metadata) rather than an atlasmap model directory (``config.json``)."""
    path = Path(path)
    if path.is_file():
        return path.name.endswith(SCVI_TOOLS_MODEL_FILE)
    if not path.is_dir() or (path / "config.json").is_file():
        return False
    return (path / HUB_METADATA_FILE).is_file() or any(path.glob(f"*{SCVI_TOOLS_MODEL_FILE}"))


def check_hub_metadata(hub: HubDirectory, ckpt: ScviToolsCheckpoint) -> None:
    """The metadata's class and version must be the ``model.pt``'s (a mismatch means mixed-up files)."""
    if hub.metadata is None:
        return
    meta_cls = hub.metadata.get("model_cls_name")
    if meta_cls is not None and str(meta_cls) != ckpt.model_name:
        raise ModelFileError(f"{hub.path / HUB_METADATA_FILE} names a {meta_cls} model but {ckpt.path.name} holds a "
                             f"{ckpt.model_name}; the scvi-hub directory mixes files of different models.")
    parent = hub.metadata.get("model_parent_module")
    if parent is not None and not str(parent).startswith("scvi."):
        raise ModelFileError(f"{hub.path / HUB_METADATA_FILE}: the model class comes from {parent!r}, not scvi-tools; "
                             "atlasmap imports scvi-tools' own SCVI, SCANVI and TOTALVI models.")


def stored_latent_fields(ckpt: ScviToolsCheckpoint) -> StoredLatent | None:
    """Where the model's minified AnnData keeps its latent, from the registry's minification fields
    (``None``: the model was not saved minified)."""
    fields = ckpt.registry.get("field_registries") or {}
    if "minify_type" not in fields:
        return None
    qzm = ckpt.field("latent_qzm")["data_registry"].get("attr_key")
    qzv = ckpt.field("latent_qzv")["data_registry"].get("attr_key")
    lib = ckpt.field("observed_lib_size")["data_registry"].get("attr_key") or "observed_lib_size"
    if not qzm or not qzv:
        raise ModelFileError(f"{ckpt.path}: the registry marks the model as minified but names no latent_qzm / "
                             "latent_qzv .obsm keys; the file is corrupt.")
    uuid = ckpt.registry.get("_scvi_uuid")
    return StoredLatent(qzm_key=str(qzm), qzv_key=str(qzv), library_key=str(lib),
                        uuid=None if uuid is None else str(uuid))


def read_hub_adata(path: str | Path) -> Any:
    """Read a hub ``adata.h5ad`` (h5ad is data: nothing in it runs)."""
    import anndata as ad

    try:
        return ad.read_h5ad(path)
    except Exception as err:  # h5py / anndata raise many types for a damaged file
        raise InputError(f"{path} is not a readable .h5ad file ({type(err).__name__}: {err}).") from None


__all__ = ["HUB_ADATA_FILE", "HUB_METADATA_FILE", "HubDirectory", "check_hub_metadata", "hub_directory",
           "is_scvi_tools_save", "read_hub_adata", "stored_latent_fields"]
