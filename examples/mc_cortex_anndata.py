"""Real Molecular Cartography mouse cortex the AnnData way: scanpy in, scanpy out.

Section A1 (all 100 genes) is the reference; section A2 with 60 of its genes
(and its cell coordinates in ``obsm["spatial"]``) is the query. A joint
clustering of both (k-means on the shared genes) goes into ``obs["cluster"]``.
The run's directory gets ``report.html`` with spatial maps.

    python examples/mc_cortex_anndata.py [DATA_DIR] [OUT_DIR]
"""

import sys

import anndata
import numpy as np
import pandas as pd
import scanpy as sc
from scipy import sparse
from sklearn.cluster import KMeans

import scimpute_dask

data = sys.argv[1] if len(sys.argv) > 1 else "../shared/data/mc_cortex"
out = sys.argv[2] if len(sys.argv) > 2 else "mc_anndata"

a1 = pd.read_csv(f"{data}/A1/matrix.csv", index_col=0)
a2 = pd.read_csv(f"{data}/A2/matrix.csv", index_col=0)
xy = pd.read_csv(f"{data}/A2/coords.csv", index_col=0).loc[a2.index, ["X", "Y"]]
panel = np.sort(np.random.default_rng(0).choice(a1.columns, 60, replace=False))


def as_adata(frame: pd.DataFrame, prefix: str) -> anndata.AnnData:
    return anndata.AnnData(sparse.csr_matrix(frame.to_numpy(np.float32)),
                           obs=pd.DataFrame(index=prefix + frame.index.astype(str)),
                           var=pd.DataFrame(index=frame.columns))


ref, spatial = as_adata(a1, "A1_"), as_adata(a2[panel], "A2_")
spatial.obsm["spatial"] = xy.to_numpy()
both = np.vstack([spatial.X.toarray(), ref[:, panel].X.toarray()])
logn = np.log1p(both / np.maximum(both.sum(axis=1, keepdims=True), 1) * 1e3)
ids = KMeans(n_clusters=6, n_init=4, random_state=0).fit_predict(logn).astype(str)
spatial.obs["cluster"], ref.obs["cluster"] = ids[: spatial.n_obs], ids[spatial.n_obs :]

imputed = scimpute_dask.impute(spatial, ref, k=15, cluster_key="cluster", outdir=out)
print(imputed)
print(f"report: {out}/report.html")
hidden = imputed.var_names[~imputed.var["measured"].to_numpy()]
sc.pp.log1p(imputed)  # a lazy X: scanpy works on it as on any Dask-backed AnnData
print("median imputed log1p expression of the unmeasured genes:",
      float(np.nanmedian(imputed[:, hidden].X.compute())))

# Any run can be reopened later with every gene imputed on demand (a run with
# impute_genes="none" stores only the neighbours, and this still works):
lazy = scimpute_dask.read_run(out)
print("Gad1 from the stored neighbours, computed now:", lazy[:, ["Gad1"]].X.compute()[:5, 0])
