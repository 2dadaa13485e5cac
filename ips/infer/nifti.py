"""3D heatmaps as NIfTI, in the source volume's world space.

How the grid maps to voxels. Inside ips a volume is `(C, Z, Y, X)`; a NIfTI source's voxel `(i, j, k)`
is our `(x, y, z)` (`data_prep.readers.NiftiReader`), and the store keeps the file's 4x4 `affine` (voxel
`(i, j, k)` -> world millimetres) in its `ips` attributes. The heatmap has one voxel per grid cell: cell
`(a, b, c)` (NIfTI order: along x, y, z) holds the patch whose level-0 top-left corner is
`origin + (c, b, a) * stride` in `(z, y, x)`, with origin and stride in level-0 voxels. Its affine is
`source_affine @ G`, where `G` maps a cell to the level-0 voxel at its patch's centre:

    G = [[s_x, 0, 0, o_x + (p_x - 1) / 2],
         [0, s_y, 0, o_y + (p_y - 1) / 2],
         [0, 0, s_z, o_z + (p_z - 1) / 2],
         [0, 0, 0, 1]]

(`s` stride, `p` patch size, `o` origin, all level-0 voxels). With stride == patch size each heatmap
voxel covers exactly its patch's voxels, so the heatmap overlays the source in any viewer and keeps
its orientation (same axis codes). A store without an affine (made from an array) gets
`diag(spacing_x, spacing_y, spacing_z) / 1000` (micrometers -> mm; 1 mm where the spacing is unknown).
Cells without a patch (background) hold 0.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ips.data.store import IpsStore


def source_affine(store: IpsStore) -> np.ndarray:
    """The 4x4 level-0 voxel `(i, j, k)` = `(x, y, z)` -> world (mm) matrix of a 3D store."""
    affine = store.attrs.get("affine")
    if affine is not None:
        return np.asarray(affine, dtype=np.float64).reshape(4, 4)
    spacing = store.source_spacing or [1000.0, 1000.0, 1000.0]  # (sz, sy, sx) micrometers of source voxels
    sz, sy, sx = (float(s) / 1000.0 for s in spacing)
    return np.diag([sx, sy, sz, 1.0])


def grid_volume(
    level0_zyx: np.ndarray, stride0: np.ndarray, values: np.ndarray, shape0: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Scatter per-patch `values (N, K)` onto the grid's cells.

    Args:
        level0_zyx: int `(N, 3)` top-left corners `(z, y, x)` in level-0 voxels; stride0 `(3,)` likewise.
        shape0: the volume's level-0 `(Z, Y, X)`: the cells cover all of it.
    Returns:
        `(volume (Gz, Gy, Gx, K) float32, origin (3,) int64)`; cells without a patch hold 0.
    """
    coords = np.asarray(level0_zyx, dtype=np.int64)
    stride = np.asarray(stride0, dtype=np.int64)
    values = np.asarray(values, dtype=np.float32).reshape(len(coords), -1)
    origin = coords[0] % stride if len(coords) else np.zeros(3, dtype=np.int64)
    if np.any((coords - origin) % stride):
        raise ValueError("patch corners are not on one regular grid; cannot write a voxel heatmap")
    cells = np.maximum(1, -(-(np.asarray(shape0, dtype=np.int64) - origin) // stride))
    cell = (coords - origin) // stride  # (N, 3)
    cells = np.maximum(cells, cell.max(axis=0) + 1 if len(cell) else cells)
    volume = np.zeros((*cells.tolist(), values.shape[1]), dtype=np.float32)
    volume[cell[:, 0], cell[:, 1], cell[:, 2]] = values
    return volume, origin


def heatmap_affine(
    affine0: np.ndarray, origin0_zyx: np.ndarray, stride0_zyx: np.ndarray, patch0_zyx: np.ndarray
) -> np.ndarray:
    """`affine0 @ G` (module docstring): heatmap cell `(a, b, c)` -> world, centred on its patch."""
    g = np.eye(4)
    for axis, zyx in enumerate((2, 1, 0)):  # NIfTI axis i, j, k = our x, y, z
        g[axis, axis] = float(stride0_zyx[zyx])
        g[axis, 3] = float(origin0_zyx[zyx]) + (float(patch0_zyx[zyx]) - 1.0) / 2.0
    return np.asarray(affine0, dtype=np.float64) @ g


def write_nifti(
    path: str | Path, volume_zyxk: np.ndarray, affine: np.ndarray, qform_code: int = 1, sform_code: int = 1
) -> Path:
    """Write `(Gz, Gy, Gx, K)` as NIfTI-1 `(Gx, Gy, Gz)` (K == 1) or `(Gx, Gy, Gz, K)`, units mm.

    Written under a temporary name and renamed (never seen half-written)."""
    import nibabel as nib

    path = Path(path)
    data = np.ascontiguousarray(volume_zyxk.transpose(2, 1, 0, 3))  # (X, Y, Z, K): NIfTI (i, j, k)
    if data.shape[3] == 1:
        data = data[..., 0]
    img = nib.Nifti1Image(data.astype(np.float32), affine)
    img.set_sform(affine, code=int(sform_code) or 1)
    img.set_qform(affine, code=int(qform_code) or 1)
    img.header.set_xyzt_units("mm")
    tmp = path.with_name(f".tmp.{path.name}")
    nib.save(img, str(tmp))
    tmp.replace(path)
    return path
