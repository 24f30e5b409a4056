"""Minified AnnData (scvi-hub): cells without counts, their latent posterior stored in ``.obsm``.

scvi-tools' ``minify_adata("latent_posterior_parameters")`` replaces ``.X`` and every layer by all-zero
matrices and keeps, per cell, the posterior mean and variance of the latent (``obsm[qzm_key]``,
``obsm[qzv_key]``; e.g. ``scanvi_latent_qzm``) and the observed library size (``obs[library_key]``). It marks
the AnnData with ``uns["_scvi_adata_minify_type"]``; the model that made it records the key names in its
registry (``field_registries["latent_qzm"]``, ...) and the AnnData's ``uns["_scvi_uuid"]``.

Such a reference can still supply its latent (for joint embeddings, kNN label transfer, label
predictions) but nothing that needs counts: :func:`check_has_counts` refuses it with a one-line
:class:`~atlasmap.errors.InputError` saying so.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from atlasmap.errors import InputError

#: ``.uns`` key by which scvi-tools marks a minified AnnData, and its value when the counts are gone.
MINIFY_TYPE_KEY = "_scvi_adata_minify_type"
LATENT_POSTERIOR = "latent_posterior_parameters"
#: The minify type that keeps the counts (the AnnData is then used like any other).
LATENT_POSTERIOR_WITH_COUNTS = "latent_posterior_parameters_with_counts"
UUID_KEY = "_scvi_uuid"


@dataclass(frozen=True)
class StoredLatent:
    """Where a model's minified AnnData keeps the latent posterior (the key names of the model's registry).

    Attributes
    ----------
    qzm_key, qzv_key
        ``.obsm`` keys of the posterior mean and *variance* (cells x n_latent).
    library_key
        ``.obs`` column of the observed library size.
    uuid
        scvi-tools' ``_scvi_uuid`` of the minified AnnData the model was saved with (``None``: unknown); a
        minified AnnData with another uuid holds another model's latent and is refused.
    """

    qzm_key: str
    qzv_key: str
    library_key: str = "observed_lib_size"
    uuid: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> StoredLatent | None:
        if not d:
            return None
        uuid = d.get("uuid")
        return cls(qzm_key=str(d["qzm_key"]), qzv_key=str(d["qzv_key"]),
                   library_key=str(d.get("library_key", "observed_lib_size")), uuid=None if uuid is None else str(uuid))


def minify_type(adata: Any) -> str | None:
    """scvi-tools' minify type of ``adata`` (``None``: not minified)."""
    uns = getattr(adata, "uns", None)
    if uns is None or MINIFY_TYPE_KEY not in uns:
        return None
    value = uns[MINIFY_TYPE_KEY]
    return value if isinstance(value, str) else str(np.asarray(value).ravel()[0])


def is_minified(adata: Any) -> bool:
    """Whether ``adata`` is a minified AnnData without counts (scvi-hub's ``latent_posterior_parameters``)."""
    kind = minify_type(adata)
    return kind is not None and kind != LATENT_POSTERIOR_WITH_COUNTS


def minified_error(what: str = "this") -> InputError:
    """The one-line error for a minified AnnData used where counts are needed."""
    return InputError(
        f"the reference AnnData is minified (scvi-hub: its counts were removed, uns[{MINIFY_TYPE_KEY!r}] is set, its "
        f"latent is stored in .obsm), and {what} needs counts: pass the full reference AnnData with its counts for "
        "that. From a minified reference atlasmap uses only the stored latent (get_latent_representation, predict, "
        "joint embedding, kNN label transfer)."
    )


def check_has_counts(adata: Any, what: str = "this") -> None:
    """Raise :func:`minified_error` if ``adata`` is minified without counts."""
    if is_minified(adata):
        raise minified_error(what)


def read_stored_latent(adata: Any, fields: StoredLatent | None, n_latent: int) -> tuple[np.ndarray, np.ndarray]:
    """The stored posterior mean and variance (float32, cells x ``n_latent``) of a minified ``adata``.

    Raises
    ------
    InputError
        The model has no record of where its latent is stored (it was not saved minified), the AnnData
        belongs to another model (``uns["_scvi_uuid"]`` differs), or the ``.obsm`` entries are missing or of
        the wrong shape.
    """
    if fields is None:
        raise minified_error("a model that was not saved with minified data (its registry names no stored latent)")
    uuid = adata.uns.get(UUID_KEY)
    if fields.uuid is not None and uuid is not None and str(uuid) != fields.uuid:
        raise InputError(
            f"this minified AnnData was made by another scvi-tools model (uns[{UUID_KEY!r}] = {uuid}, the model's "
            f"is {fields.uuid}): its stored latent is not this model's. Use the adata.h5ad saved with the model."
        )
    out = []
    for key in (fields.qzm_key, fields.qzv_key):
        if key not in adata.obsm:
            raise InputError(f"the minified AnnData has no obsm[{key!r}] (the stored latent its model names); it is "
                             "incomplete. Use the adata.h5ad saved with the model.")
        values = np.asarray(adata.obsm[key], dtype=np.float32)
        if values.shape != (adata.n_obs, n_latent) or not np.isfinite(values).all():
            raise InputError(f"obsm[{key!r}] of the minified AnnData has shape {values.shape} (or non-finite values); "
                             f"the model's latent is {adata.n_obs} x {n_latent}.")
        out.append(values)
    if (out[1] <= 0).any():
        raise InputError(f"obsm[{fields.qzv_key!r}] (the stored posterior variance) holds non-positive values.")
    return out[0], out[1]


__all__ = ["LATENT_POSTERIOR", "LATENT_POSTERIOR_WITH_COUNTS", "MINIFY_TYPE_KEY", "StoredLatent", "check_has_counts",
           "is_minified", "minified_error", "minify_type", "read_stored_latent"]
