"""scimpute's API, unchanged but for the import, on the built-in synthetic pair."""

from scimpute_dask import expression_imputation
from scimpute_dask.synthetic import make_pair

pair = make_pair(n_query=2000, n_reference=1500, n_genes=1000, n_panel=100)

# DataFrames are cells × genes, as scimpute takes them; paths to scimpute TSVs work too.
result = expression_imputation(
    pair.query,
    pair.reference,
    pair.identities,
    cell_name_column_idx=0,
    outdir="dropin_output",
    k_neighbors=25,
    consider_clusters=True,
    save_chunks=False,
)
print(result)
