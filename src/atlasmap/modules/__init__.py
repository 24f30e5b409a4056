"""The torch modules of atlasmap's models: inference, generative model and loss of scVI, scANVI and totalVI
(:mod:`.scvi`, :mod:`.scanvi`, :mod:`.totalvi`) on the shared :class:`.base.CVAEModule`, and the names of the
per-cell fields they read. Built on :mod:`atlasmap.nn`; nothing here knows AnnData, files or training."""
