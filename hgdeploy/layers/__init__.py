"""Token clustering and token reconstruction as parameter-free, static-shape tensor code.

No model knowledge lives here. Every index set (pooling cells, neighbourhoods) is a constant built at
construction time (`tables`), so an ONNX export sees only MatMul/Softmax/TopK/Gather with fixed shapes:
`clustering` (local soft k-means, dense or local form), `reconstruction` (and the pooling/bilinear
baselines), `mixing` (their weighted sums of tokens, the part that is safe in fp16), `windows` (both inside every window of a windowed transformer), `tau` (tau = "auto").
"""

from hgdeploy.layers.clustering import EMPTY_CLUSTER_EPS, TokenClustering, choose_form, clustering_macs
from hgdeploy.layers.mixing import WeightedSum
from hgdeploy.layers.reconstruction import BilinearUpsampling, TokenPooling, TokenReconstruction
from hgdeploy.layers.tables import (
                                    MASK_PENALTY,
                                    inverse_table,
                                    neighbour_table,
                                    neighbourhood_mask,
                                    own_cells,
                                    pooling_matrix,
                                    pooling_matrix_1d,
                                    sparse_rows,
                                    squared_distances,
                                    take,
)
from hgdeploy.layers.tau import TAU_SHARPNESS, calibrate_tau, sharpness
from hgdeploy.layers.windows import (
                                    WindowTokenClustering,
                                    WindowTokenReconstruction,
                                    dropped_clusters,
                                    grid_size,
                                    kept_size,
                                    padded_size,
                                    window_merge,
                                    window_partition,
)

__all__ = ["BilinearUpsampling", "EMPTY_CLUSTER_EPS", "MASK_PENALTY", "TAU_SHARPNESS", "TokenClustering",
           "TokenPooling", "TokenReconstruction", "WeightedSum", "WindowTokenClustering", "WindowTokenReconstruction",
           "calibrate_tau", "choose_form", "clustering_macs", "dropped_clusters", "grid_size", "inverse_table",
           "kept_size", "neighbour_table", "neighbourhood_mask", "own_cells", "padded_size", "pooling_matrix",
           "pooling_matrix_1d", "sharpness", "sparse_rows", "squared_distances", "take", "window_merge",
           "window_partition"]
