#!/usr/bin/env bash
# Impute real Molecular Cartography mouse cortex: section A1 (all 100 genes) is
# the reference, section A2 with 60 of its genes is the query. The remaining 40
# genes are imputed and can be compared with what A2 measured.
set -euo pipefail
DATA=${DATA:-../shared/data/mc_cortex}
OUT=${OUT:-mc_example}
mkdir -p "$OUT"
python - "$DATA" "$OUT" <<'PY'
import sys
import numpy as np
import pandas as pd
from sklearn.cluster import KMeans

data, out = sys.argv[1:]
ref = pd.read_csv(f"{data}/A1/matrix.csv", index_col=0)
query = pd.read_csv(f"{data}/A2/matrix.csv", index_col=0)
ref.index = "A1_" + ref.index.astype(str)
query.index = "A2_" + query.index.astype(str)
panel = np.sort(np.random.default_rng(0).choice(ref.columns, 60, replace=False))
ref.to_csv(f"{out}/A1.csv")
query[panel].T.to_csv(f"{out}/A2_panel.tsv", sep="\t")      # scimpute layout
both = pd.concat([query[panel], ref[panel]])                  # joint clustering
logn = np.log1p(both.div(both.sum(axis=1).replace(0, 1), axis=0) * 1e3)
ids = KMeans(n_clusters=6, n_init=4, random_state=0).fit_predict(logn)
pd.DataFrame({"cell": both.index, "id": ids}).to_csv(f"{out}/identities.tsv", sep="\t",
                                                     index=False)
PY
scimpute-dask run --query "$OUT/A2_panel.tsv" --reference "$OUT/A1.csv" \
    --reference-layout cells_x_genes --identities "$OUT/identities.tsv" --name-column 0 \
    --k 15 --out "$OUT/imputation"
