"""Volume node -> checked snapshot -> NRRD bytes for the server.

Only the voxels and the IJK-to-RAS geometry leave: no node name, no DICOM tags, no attributes.
Every rule the server would refuse a volume for is checked here first (same limits as
`medpruner.volume_io`), so the user gets a clear message before anything is sent.

Threading: `snapshot_volume` reads the node and must run on the main thread (VTK objects are not
thread-safe); it copies the voxels, so the `VolumeSnapshot` can be encoded and sent from a worker
thread while the user keeps working (and even edits or deletes the node).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from .errors import VolumeExportError
from .nrrd_io import encode_nrrd
from .scene_utils import nodes_by_class

__all__ = [
    "MAX_AXIS_VOXELS",
    "MAX_TOTAL_VOXELS",
    "MIN_AXIS_VOXELS",
    "VolumeSnapshot",
    "acquisition_warning",
    "ijk_to_ras_array",
    "snapshot_volume",
    "volume_fingerprint",
]

# The server's limits (medpruner.volume_io); a test keeps them equal.
MIN_AXIS_VOXELS = 2
MAX_AXIS_VOXELS = 2048
MAX_TOTAL_VOXELS = 2**30

_NOT_SCALAR_CLASSES = ("vtkMRMLTensorVolumeNode", "vtkMRMLVectorVolumeNode", "vtkMRMLDiffusionWeightedVolumeNode",
                       "vtkMRMLDiffusionTensorVolumeNode", "vtkMRMLMultiVolumeNode")


@dataclass(frozen=True)
class VolumeSnapshot:
    """A private copy of a volume's voxels [k, j, i] and its IJK-to-RAS matrix."""

    array: np.ndarray
    ijk_to_ras: np.ndarray

    def to_nrrd(self, compress: bool = True) -> bytes:
        """NRRD bytes in LPS space (see nrrd_io); safe to call from a worker thread."""
        return encode_nrrd(self.array, self.ijk_to_ras, compress=compress)

    @property
    def shape_ijk(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape[::-1])

    def fingerprint(self) -> str:
        """Equal to `volume_fingerprint` of the node it was taken from, while that node is unchanged."""
        return _fingerprint(self.array, self.ijk_to_ras)


def ijk_to_ras_array(volume_node) -> np.ndarray:
    """The node's own 4x4 IJK-to-RAS matrix as numpy (its parent transform, if any, is not applied)."""
    import vtk

    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def _voxel_array(volume_node) -> np.ndarray:
    from vtk.util import numpy_support

    image = volume_node.GetImageData()
    dims = image.GetDimensions()
    scalars = image.GetPointData().GetScalars() if image.GetPointData() else None
    if scalars is None:
        raise VolumeExportError("The selected volume has no voxel data.",
                                "Load the volume again, or choose another volume.")
    return numpy_support.vtk_to_numpy(scalars).reshape(dims[::-1])


def _is_in_sequence(volume_node) -> bool:
    scene = volume_node.GetScene()
    if scene is None:
        return False
    return any(browser.IsProxyNodeID(volume_node.GetID()) for browser in nodes_by_class(scene, "vtkMRMLSequenceBrowserNode"))


def acquisition_warning(volume_node) -> str | None:
    """What to tell the user when Slicer's DICOM import flagged the node's series as irregular, else None.

    Slicer's DICOM scalar-volume plugin loads an irregular series (uneven spacing, gantry tilt) on a regular
    grid and adds a grid transform named "<volume> acquisition transform" above the node to put each slice
    back where its header says. The model sees the regular voxel grid; the heatmaps follow the same parent
    transform, so they stay on the voxels the model saw.
    """
    node = volume_node.GetParentTransformNode() if volume_node is not None else None
    while node is not None:
        name = node.GetName() or ""
        if "acquisition transform" in name.lower():
            return (f"Slicer flagged this DICOM series as irregular (its slices are not a regular grid) and placed it "
                    f"with the transform '{name}'. The model saw the regular voxel grid; the heatmaps follow the same "
                    "transform, so they lie on the voxels it saw.")
        node = node.GetParentTransformNode()
    return None


def snapshot_volume(volume_node) -> VolumeSnapshot:
    """Check `volume_node` and copy its voxels and geometry (main thread only). Raises VolumeExportError."""
    if volume_node is None:
        raise VolumeExportError("No input volume is selected.", "Load a CT or MR volume and select it as the input.")
    if not volume_node.IsA("vtkMRMLScalarVolumeNode") or any(volume_node.IsA(c) for c in _NOT_SCALAR_CLASSES):
        four_d = volume_node.IsA("vtkMRMLMultiVolumeNode")
        raise VolumeExportError(
            "The selected volume is a 4D (multi-frame) volume." if four_d
            else f"The selected volume is a {volume_node.GetClassName().replace('vtkMRML', '')}, not a scalar volume.",
            "Extract one 3D frame (Sequences or MultiVolumeExplorer module) and select it." if four_d
            else "Select a scalar (grey-level) CT or MR volume.",
        )
    if volume_node.GetAttribute("MultiVolume.NumberOfFrames") or _is_in_sequence(volume_node):
        raise VolumeExportError(
            "The selected volume is one frame of a 4D (time series) volume.",
            "Save the current frame as its own volume (Sequences module, or right-click > Clone) and select that.",
        )
    image = volume_node.GetImageData()
    if image is None or 0 in image.GetDimensions() or image.GetNumberOfPoints() == 0:
        raise VolumeExportError("The selected volume is empty (it has no voxels).",
                                "Load the volume again, or choose another volume.")
    components = image.GetNumberOfScalarComponents()
    if components != 1:
        raise VolumeExportError(
            f"The selected volume has {components} components per voxel (e.g. RGB, vector or 4D).",
            "Convert it to a single-component scalar volume first (Vector to Scalar Volume module).",
        )
    dims = tuple(int(d) for d in image.GetDimensions())
    if min(dims) < MIN_AXIS_VOXELS:
        raise VolumeExportError(
            f"The selected volume has size {dims}: a single slice is a 2D image, not a 3D volume.",
            f"Select a 3D volume with at least {MIN_AXIS_VOXELS} voxels along every axis.",
        )
    if max(dims) > MAX_AXIS_VOXELS or int(np.prod(dims, dtype=np.int64)) > MAX_TOTAL_VOXELS:
        raise VolumeExportError(
            f"The selected volume is too large ({dims[0]} x {dims[1]} x {dims[2]} voxels; at most "
            f"{MAX_AXIS_VOXELS} per axis and {MAX_TOTAL_VOXELS} in all).",
            "Crop or downsample it first (Crop Volume module).",
        )
    matrix = ijk_to_ras_array(volume_node)
    if not np.all(np.isfinite(matrix)) or abs(np.linalg.det(matrix[:3, :3])) < 1e-9:
        raise VolumeExportError("The selected volume has an invalid geometry (zero spacing or degenerate axes).",
                                "Fix its spacing and orientation in the Volumes module.")
    array = np.array(_voxel_array(volume_node), copy=True)
    if array.dtype.kind not in "iuf":
        raise VolumeExportError(f"Voxel type {array.dtype} is not supported.", "Cast the volume to a numeric type.")
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        raise VolumeExportError("The selected volume contains NaN or infinite voxels.",
                                "Replace them with a real value (e.g. the background) before asking.")
    if array.min() == array.max():
        raise VolumeExportError(
            f"The selected volume is constant (every voxel is {array.flat[0].item()}): there is nothing to see.",
            "Check that the right volume is selected and that its voxels were loaded.",
        )
    return VolumeSnapshot(array=array, ijk_to_ras=matrix)


def _fingerprint(array: np.ndarray, ijk_to_ras: np.ndarray) -> str:
    digest = hashlib.sha256()
    array = np.ascontiguousarray(array)
    digest.update(str((array.dtype.str, array.shape)).encode())
    digest.update(memoryview(array).cast("B"))
    digest.update(np.ascontiguousarray(ijk_to_ras, dtype=np.float64).tobytes())
    return digest.hexdigest()


def volume_fingerprint(volume_node) -> str:
    """sha256 of a volume's voxels, voxel type, shape and IJK-to-RAS matrix: tells that a volume is
    unchanged (no copy of the voxels is made)."""
    return _fingerprint(_voxel_array(volume_node), ijk_to_ras_array(volume_node))
