"""Small MRML helpers shared by the scene-logic modules (work on any vtkMRMLScene, app or headless)."""
from __future__ import annotations

__all__ = ["nodes_by_class", "place_in_folder", "subject_hierarchy"]


def nodes_by_class(scene, class_name: str) -> list:
    """Every node of `class_name` (subclasses included) in `scene`, as a Python list."""
    collection = scene.GetNodesByClass(class_name)
    collection.UnRegister(None)   # GetNodesByClass returns a new reference the caller owns
    return [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]


def subject_hierarchy(scene):
    """The scene's subject hierarchy node (created when missing)."""
    import slicer

    return slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)


def place_in_folder(scene, node, folder_item: int) -> int:
    """Put `node` under `folder_item`; returns its item.

    In the Slicer app, subject-hierarchy plugins create an item for every node added to the scene;
    on bare MRML (slicer-core) nothing does, so the item is created here when it is missing.
    """
    sh = subject_hierarchy(scene)
    item = sh.GetItemByDataNode(node)
    if item:
        sh.SetItemParent(item, folder_item)
    else:
        item = sh.CreateItem(folder_item, node)
    return item
