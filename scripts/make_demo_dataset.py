"""Build the embedded demo subset src/atlasmap/datasets/kang2018_demo.h5ad from the shared Kang file.

All 1,975 cells; the 2,000 most variable genes (scanpy 'seurat' flavour on a log-normalised copy);
raw counts unchanged. Run: python scripts/make_demo_dataset.py ../shared/data/kang2018_ifnb_scgen_valid/kang2018_ifnb_scgen_valid_counts.h5ad
"""

import sys

import anndata as ad
import numpy as np
import scanpy as sc
import scipy.sparse as sp

src = sys.argv[1]
out = sys.argv[2] if len(sys.argv) > 2 else "src/atlasmap/datasets/kang2018_demo.h5ad"
adata = ad.read_h5ad(src)
norm = adata.copy()
sc.pp.normalize_total(norm, target_sum=1e4)
sc.pp.log1p(norm)
sc.pp.highly_variable_genes(norm, n_top_genes=2000, flavor="seurat")
genes = norm.var_names[norm.var["highly_variable"]]
demo = adata[:, genes].copy()
demo.X = sp.csr_matrix(demo.X, dtype=np.float32)
demo.obs = demo.obs[["batch", "cell_type", "n_counts_original"]].copy()
demo.var = demo.var[["gene_symbol"]].copy()
demo.obsm.clear()
demo.uns = {"source": "Kang et al. 2018 (GSE96583) via scGen valid.h5ad; see PROVENANCE.md"}
assert np.array_equal(demo.X.data, np.round(demo.X.data))
demo.write_h5ad(out, compression="gzip")
print(demo, "->", out)
